"""A guide made of several segmentors (``train.segmentor.guides``): the ensemble's maths, its
stages and seeds, and a smoke run that trains, fine-tunes against and evaluates with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from segcft.config import load_run_config
from segcft.errors import ConfigError, UserError
from segcft.models.ensemble import SegmentorEnsemble
from segcft.ops import soft_area
from segcft.run import guide_stages
from segcft.train import load_run, run_training
from segcft.train.pipeline import _select_stages
from segcft.train.stages import GUIDE_SEED_STEP, segmentor_seed, stage_entry, stage_names

torch.set_num_threads(1)


class _Conv(nn.Module):
    classes = ("background", "a", "b")
    spatial_dims = 2

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * self.conv(x)


def test_ensemble_probabilities_and_soft_areas_are_the_members_mean():
    members = [_Conv(s) for s in range(3)]
    ens = SegmentorEnsemble(members)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    probs = torch.softmax(ens(x), dim=1)
    mean = torch.stack([torch.softmax(m(x), dim=1) for m in members]).mean(0)
    torch.testing.assert_close(probs, mean, rtol=1e-5, atol=1e-6)
    areas = soft_area(ens(x), spacing=(0.5, 0.5))
    member_areas = torch.stack([soft_area(m(x), spacing=(0.5, 0.5)) for m in members]).mean(0)
    torch.testing.assert_close(areas, member_areas, rtol=1e-5, atol=1e-5)
    areas[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the image gradient reaches every member
    assert ens.classes == _Conv.classes and ens.spatial_dims == 2


def test_ensemble_rejects_one_member_and_mismatched_members():
    with pytest.raises(ValueError, match="at least 2"):
        SegmentorEnsemble([_Conv(0)])
    other = _Conv(1)
    other.classes = ("background", "a")  # type: ignore[misc]
    with pytest.raises(ValueError, match="member 2"):
        SegmentorEnsemble([_Conv(0), other])


def test_guide_stages_seeds_and_requirements():
    cfg = load_run_config(None, "smoke", ["train.segmentor.guides=3", "cft.modes=[none,reg,seg]"])
    assert guide_stages(cfg) == ["segmentor", "segmentor-2", "segmentor-3"]
    names = stage_names(cfg)
    assert names[names.index("segmentor") : names.index("segmentor") + 3] == guide_stages(cfg)
    assert set(guide_stages(cfg)) <= set(stage_entry(cfg, "cft-seg").requires(cfg, "cft-seg"))
    assert not {"segmentor-2", "segmentor-3"} & set(stage_entry(cfg, "cft-reg").requires(cfg, "cft-reg"))
    seeds = [segmentor_seed(7, s) for s in (*guide_stages(cfg), "eval_segmentor")]
    assert seeds == [7, 7 + GUIDE_SEED_STEP, 7 + 2 * GUIDE_SEED_STEP, 8] and len(set(seeds)) == 4
    assert _select_stages(names, ["segmentor"], None) == set(guide_stages(cfg))  # --only segmentor: all members
    assert _select_stages(names, ["segmentor-2"], None) == {"segmentor-2"}
    one = load_run_config(None, "smoke", [])
    assert guide_stages(one) == ["segmentor"]
    with pytest.raises(ConfigError, match="guides"):
        load_run_config(None, "smoke", ["train.segmentor.guides=0"])


@pytest.mark.timeout(180)
def test_smoke_run_with_a_guide_ensemble(tmp_path):
    cfg = load_run_config(None, "smoke", ["train.segmentor.guides=2", "cft.modes=[none,seg]", "evaluate.n=4"])
    report = run_training(cfg, tmp_path)
    ckpt = tmp_path / "checkpoints"
    first, second = (torch.load(ckpt / f"{s}.pt", weights_only=True) for s in ("segmentor", "segmentor-2"))
    assert first["seed"] == cfg.seed and second["seed"] == cfg.seed + GUIDE_SEED_STEP
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert {"segmentor", "segmentor-2", "eval_segmentor"} <= set(gates)
    run = load_run(tmp_path)
    assert isinstance(run.segmentor, SegmentorEnsemble) and len(run.segmentor.members) == 2
    assert not isinstance(run.eval_segmentor, SegmentorEnsemble)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["guide_members"] == 2
    assert "ensemble of 2 segmentors" in report.read_text()
    # one guide can be imported, not an ensemble
    with pytest.raises(UserError, match=r"train\.segmentor\.guides"):
        run_training(cfg, tmp_path / "imported", segmentor_checkpoint=ckpt / "segmentor.pt")
