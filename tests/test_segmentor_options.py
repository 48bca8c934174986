"""Segmentor options for small structures: class-weighted / focal cross-entropy, and the
measurement temperature that keeps diffuse background probability out of soft volumes, the same
in evaluation and in fine-tuning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from segcft.config.schema import CFTConfig
from segcft.data import ccta_phantom
from segcft.data.configs import CCTAPhantomConfig
from segcft.errors import ConfigError
from segcft.evaluation.measure import Measurer
from segcft.models.configs import UNetConfig
from segcft.models.segmentation import segmentation_loss
from segcft.models.unet import build
from segcft.ops import soft_area
from segcft.train.losses import SegmentorLoss

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _logits_and_mask(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(2, 3, 4, 5, 6, generator=g), torch.randint(0, 3, (2, 4, 5, 6), generator=g)


def test_uniform_weights_and_gamma_zero_give_the_plain_loss() -> None:
    logits, mask = _logits_and_mask()
    plain = segmentation_loss(logits, mask)
    torch.testing.assert_close(segmentation_loss(logits, mask, class_weights=(1.0, 1.0, 1.0)), plain)
    torch.testing.assert_close(segmentation_loss(logits, mask, class_weights=(4.0, 4.0, 4.0)), plain)
    torch.testing.assert_close(segmentation_loss(logits, mask, focal_gamma=0.0), plain)


def test_weights_and_focal_change_the_cross_entropy_term() -> None:
    logits, mask = _logits_and_mask()
    dice = segmentation_loss(logits, mask) - torch.nn.functional.cross_entropy(logits, mask)
    w = torch.tensor([1.0, 2.0, 10.0])
    weighted = segmentation_loss(logits, mask, class_weights=tuple(w.tolist()))
    torch.testing.assert_close(weighted, dice + torch.nn.functional.cross_entropy(logits, mask, weight=w))
    focal = segmentation_loss(logits, mask, focal_gamma=2.0)
    assert float(focal) < float(segmentation_loss(logits, mask))  # (1 - p)^2 < 1 shrinks every term
    with pytest.raises(ValueError, match="one per class"):
        segmentation_loss(logits, mask, class_weights=(1.0, 2.0))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_weighted_focal_gradients_are_finite_even_on_confident_logits(gamma: float) -> None:
    logits, mask = _logits_and_mask(scale=60.0)
    logits[:, 0] = 200.0  # background certain everywhere, right or wrong
    logits.requires_grad_(True)
    segmentation_loss(logits, mask, class_weights=(1.0, 3.0, 30.0), focal_gamma=gamma).backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def _info() -> object:
    return ccta_phantom.build(CCTAPhantomConfig(depth=16, side=8, train_size=2, val_size=2, test_size=2), "val").info


def test_the_segmentor_trains_on_its_own_loss_and_checks_the_weights() -> None:
    info = _info()
    torch.manual_seed(0)
    seg = build(UNetConfig(channels=(4, 8), class_weights=(1.0, 2.0, 20.0), focal_gamma=1.0), info)
    x, mask = torch.rand(2, 1, 16, 8, 8) * 2 - 1, torch.randint(0, 3, (2, 16, 8, 8))
    intensity = SimpleNamespace(shift=0.0, scale=0.0)
    out = SegmentorLoss(seg, intensity, torch.Generator())({"image": x, "mask": mask})
    torch.testing.assert_close(out["loss"], segmentation_loss(seg(x), mask, (1.0, 2.0, 20.0), 1.0))
    assert float(out["loss"].detach()) != pytest.approx(float(segmentation_loss(seg(x), mask).detach()))
    with pytest.raises(ConfigError, match=r"class_weights must give one weight per class"):
        build(UNetConfig(channels=(4, 8), class_weights=(1.0, 2.0)), info)


class _Fixed(nn.Module):
    """A "network" that returns the same logits whatever the image."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape[1:]).clone()


def _segmentor(logits: torch.Tensor, temperature: float) -> nn.Module:
    info = ccta_phantom.build(CCTAPhantomConfig(train_size=2, val_size=2, test_size=2), "val").info
    seg = build(UNetConfig(channels=(4, 8), measure_temperature=temperature), info)
    seg.net = _Fixed(logits)
    return seg.eval()


def _plaque_logits(p_background_plaque: float) -> torch.Tensor:
    """(1, 3, 64, 32, 32): lumen and plaque at probability p everywhere, and a 100-voxel plaque
    (about 12 mm^3, a mid plaque) at probability 0.99 in one corner."""
    logits = torch.zeros(1, 3, 64, 32, 32)
    off = torch.log(torch.tensor(p_background_plaque / (1 - 2 * p_background_plaque)))
    logits[:, 1:] = off
    logits[:, 2, :4, :5, :5] = torch.log(torch.tensor(0.99 / 0.005))  # plaque 0.99, the rest 0.005 each
    logits[:, 1, :4, :5, :5] = 0.0
    return logits


def test_the_temperature_removes_diffuse_background_volume_and_keeps_real_structures() -> None:
    x = torch.zeros(1, 1, 64, 32, 32)
    info = _segmentor(torch.zeros(1, 3, 1, 1, 1), 1.0).classes
    assert info == ("background", "lumen", "plaque")
    voxel = 0.75 * 0.4 * 0.4
    region = 21_800  # voxels of a third of the volume, one region
    diffuse = torch.zeros(1, 3, 64, 32, 32)
    diffuse[:, 1:] = torch.log(torch.tensor(1e-3 / (1 - 2e-3)))
    raw = soft_area(_segmentor(diffuse, 1.0)(x), spacing=(0.75, 0.4, 0.4))[0, 2]
    assert float(raw) == pytest.approx(65_536 * 1e-3 * voxel, rel=1e-3)  # 7.9 mm^3 over the volume
    assert float(raw) * region / 65_536 == pytest.approx(2.6, abs=0.05)  # the 2.6 mm^3 of one region
    sharp = soft_area(_segmentor(diffuse, 0.5)(x), spacing=(0.75, 0.4, 0.4))[0, 2]
    assert float(sharp) < 0.01 * float(raw)
    real = _plaque_logits(1e-9)  # nothing diffuse: only the 100-voxel plaque
    v1 = soft_area(_segmentor(real, 1.0)(x), spacing=(0.75, 0.4, 0.4))[0, 2]
    v_half = soft_area(_segmentor(real, 0.5)(x), spacing=(0.75, 0.4, 0.4))[0, 2]
    assert float(v1) == pytest.approx(100 * 0.99 * voxel, rel=1e-3)
    assert float(v_half) == pytest.approx(float(v1), rel=0.02)


def test_training_mode_sees_raw_logits_and_the_argmax_never_changes() -> None:
    logits = _plaque_logits(1e-3)
    seg = _segmentor(logits, 0.25)
    x = torch.zeros(1, 1, 64, 32, 32)
    torch.testing.assert_close(seg(x), logits / 0.25)
    assert torch.equal(seg(x).argmax(1), logits.argmax(1))
    seg.train()
    torch.testing.assert_close(seg(x), logits)


def test_evaluation_and_fine_tuning_measure_the_same_volumes() -> None:
    """The pos-seg guide loss is zero exactly when its targets are what the evaluation's
    Measurer reads from the same segmentor: both take the sharpened soft volumes."""
    from segcft.objectives.base import build_objective

    seg = _segmentor(_plaque_logits(1e-3), 0.5)
    info = ccta_phantom.build(CCTAPhantomConfig(train_size=2, val_size=2, test_size=2), "val").info
    sample = ccta_phantom.build(CCTAPhantomConfig(train_size=2, val_size=2, test_size=2), "val")[0]
    regions = torch.as_tensor(sample["regions"]).long()[None]
    x = torch.zeros(1, 1, 64, 32, 32)
    with torch.no_grad():
        measured = Measurer(info)(seg(x), regions)
        raw = Measurer(info)(seg.net(x), regions)
    cft = CFTConfig(lr=1e-3, damping=0.0)
    obj = build_objective("pos-seg", info, cft, eps=1e3, segmentor=seg.train())
    obj.train()  # what the fine-tuning loop does; the frozen guide stays in eval mode
    assert not seg.training
    structure = torch.tensor([v.is_structure for v in info.variables])

    def guide(phys: torch.Tensor) -> float:
        pa = info.normalise(torch.where(structure, phys, torch.zeros_like(phys)).float())
        _, logs = obj.guide_loss(x, pa, {"image": x, "regions": regions}, "plaque_mid")
        return logs["seg"]

    assert float(measured[0, info.index("plaque_mid")]) < 0.1 * float(raw[0, info.index("plaque_mid")])
    assert guide(measured) < 1e-4 < guide(raw)
