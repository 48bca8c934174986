"""The cnn regressor: outputs per variable in 2D and 3D, likelihoods, short training, save/load."""

from __future__ import annotations

import io
import math

import pytest
import torch

from segcft.data.variables import DatasetInfo, Measure, Variable, fit_normalisation
from segcft.errors import ConfigError
from segcft.models.configs import CNNRegressorConfig
from segcft.models.regressor import build
from segcft.protocols import Regressor

VARIABLES = [
    Variable("disk_area", "continuous", unit="mm^2", measure=Measure("disk")),
    Variable("brightness", "continuous"),
    Variable("marked", "binary"),
]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def disks(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a disk of random radius and brightness, with a bright top band when marked;
    parents (area in pixels, brightness, marked) in physical units."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy, cx = (torch.rand(2, n, generator=g) * 0.3 + 0.35) * size
    r = (torch.rand(n, generator=g) * 0.15 + 0.1) * size
    bright = torch.rand(n, generator=g) * 0.8
    marked = (torch.rand(n, generator=g) < 0.5).float()
    disk = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 < r[:, None, None] ** 2
    img = torch.where(disk, bright[:, None, None] - 0.2, torch.full((n, size, size), -0.8))
    img[:, : size // 8, :] += 0.6 * marked[:, None, None]
    img = img + 0.1 * torch.randn(n, size, size, generator=g)
    parents = torch.stack([disk.flatten(1).sum(1).float(), bright, marked], dim=1)
    return img.clamp(-1, 1)[:, None], parents


def make_info(parents: torch.Tensor, spatial_dims: int = 2, shape: tuple[int, ...] = (32, 32)) -> DatasetInfo:
    return DatasetInfo(
        name="disks",
        spatial_dims=spatial_dims,
        shape=shape,
        spacing=(1.0,) * spatial_dims,
        structures={1: "disk"},
        variables=VARIABLES,
        normalisation=fit_normalisation(VARIABLES, parents.tolist()),
    )


def train(model: torch.nn.Module, images: torch.Tensor, parents: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (16,), generator=g)
        loss = model.nll(images[idx], parents[idx]).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_outputs_in_2d_and_3d() -> None:
    _, parents = disks(64, 32, seed=0)
    info = make_info(parents)
    torch.manual_seed(0)
    reg = build(CNNRegressorConfig(), info).eval()
    assert isinstance(reg, Regressor) and reg.spatial_dims == 2
    out = reg(torch.randn(4, 1, 32, 32))
    assert out["loc"].shape == (4, 3) and out["scale"].shape == (4, 3)
    assert bool((out["scale"][:, 2] == 1).all()) and bool((out["scale"][:, :2] >= 1e-2).all())
    assert reg(torch.randn(2, 1, 37, 29))["loc"].shape == (2, 3)  # any input size
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in reg.modules())
    info3 = make_info(parents, 3, (16, 8, 8))
    reg3 = build(CNNRegressorConfig(width=8, depth=3), info3).eval()
    assert reg3.spatial_dims == 3 and reg3(torch.randn(2, 1, 16, 8, 8))["loc"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(B, 1, \*S\)"):
        reg(torch.randn(2, 32, 32))


def test_predictions_do_not_depend_on_the_batch() -> None:
    images, parents = disks(8, 32, seed=1)
    torch.manual_seed(0)
    reg = build(CNNRegressorConfig(), make_info(parents)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reg(images)["loc"][:2], reg(images[:2])["loc"], atol=1e-5, rtol=1e-5)


def test_nll_matches_gaussian_and_bernoulli() -> None:
    images, parents = disks(4, 32, seed=2)
    info = make_info(parents)
    torch.manual_seed(0)
    reg = build(CNNRegressorConfig(), info).eval()
    targets = info.normalise(parents)
    targets[:, 2] = torch.tensor([0.0, 1.0, 0.3, 0.9])  # soft labels
    with torch.no_grad():
        out, nll = reg(images), reg.nll(images, targets)
        gauss = -torch.distributions.Normal(out["loc"][:, :2], out["scale"][:, :2]).log_prob(targets[:, :2])
        p = torch.sigmoid(out["loc"][:, 2])
        bern = -(targets[:, 2] * torch.log(p) + (1 - targets[:, 2]) * torch.log(1 - p))
        torch.testing.assert_close(nll[:, :2], gauss)
        torch.testing.assert_close(nll[:, 2], bern)
        pred = reg.predict(images)
        torch.testing.assert_close(pred[:, 2], p)
        torch.testing.assert_close(pred[:, :2], out["loc"][:, :2])
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        reg.nll(images, targets[:, :2])


def test_short_training_beats_the_mean_predictor() -> None:
    """200 steps on disks, median over three initialisation seeds.

    A short run's outcome depends on the CPU's instruction set and the thread count (area MAE
    0.17-0.36 across seeds and ISAs), and one seed in three may not learn brightness in 200
    steps, so the test asserts on the median against what a broken model scores: predicting
    the training mean gives MAE 0.87 (area) and 0.88 (brightness), accuracy about 0.5 and a
    Gaussian nll of about 1.4 in standard units. Measured medians: area 0.21-0.29, brightness
    0.14-0.22, accuracy 1.0, nll 0.11-0.35."""
    images, parents = disks(512, 32, seed=3)
    test_images, test_parents = disks(128, 32, seed=4)
    info = make_info(parents)
    targets, test_targets = info.normalise(parents), info.normalise(test_parents)
    trivial = (test_targets[:, :2] - targets[:, :2].mean(0)).abs().mean(0)
    runs = []
    for seed in range(3):
        torch.manual_seed(seed)
        reg = build(CNNRegressorConfig(), info)
        train(reg, images, targets, steps=200, lr=2e-3)
        with torch.no_grad():
            pred = reg.predict(test_images)
            nll = reg.nll(test_images, test_targets).mean(0)
        mae = (pred[:, :2] - test_targets[:, :2]).abs().mean(0)
        accuracy = ((pred[:, 2] > 0.5).float() == test_targets[:, 2]).float().mean()
        runs.append(torch.cat([mae, accuracy[None], nll[:2].mean()[None]]))
    mae_area, mae_bright, accuracy, nll = torch.stack(runs).median(0).values.tolist()
    assert float(trivial.min()) > 0.8  # the mean predictor is as bad as the docstring says
    assert mae_area < 0.5 * float(trivial[0]) and mae_bright < 0.5 * float(trivial[1]), runs
    assert accuracy > 0.9, runs
    assert nll < 0.7, runs


def test_trains_on_the_cxr_phantom() -> None:
    """300 steps on 512 phantom subjects at 32 x 32, median over three initialisation seeds,
    against the mean predictor (a broken model): normalised MAE of the mean predictor 0.72 (age),
    0.75, 0.74 and 0.76 (right lung, left lung, heart). Measured medians across seeds and
    instruction sets: age 0.30, areas 0.30, 0.35 and 0.39; single seeds reach 0.52 (heart)."""
    from segcft.data import cxr_phantom as cxr
    from segcft.data.configs import CXRPhantomConfig

    config = CXRPhantomConfig(size=32, train_size=512, val_size=8, test_size=128)
    train_set, test_set = cxr.build(config, "train"), cxr.build(config, "test")

    def stack(ds: object, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [ds[i] for i in range(n)]  # type: ignore[index]
        return torch.stack([it["image"] for it in items]), torch.stack([it["parents"] for it in items])

    images, parents = stack(train_set, 512)
    test_images, test_parents = stack(test_set, 128)
    trivial = (test_parents - parents.mean(0)).abs().mean(0)
    runs = []
    for seed in range(3):
        torch.manual_seed(seed)
        reg = build(CNNRegressorConfig(), train_set.info)
        train(reg, images, parents, steps=300, lr=1e-3)
        with torch.no_grad():
            runs.append((reg.predict(test_images) - test_parents).abs().mean(0))
    mae = torch.stack(runs).median(0).values
    age, areas = train_set.info.index("age"), mae[3:]
    assert [v.name for v in train_set.info.variables][3:] == ["right_lung_area", "left_lung_area", "heart_area"]
    assert float(trivial[3:].min()) > 0.7 and float(trivial[age]) > 0.7  # the broken-model score
    assert bool((areas < 0.7 * trivial[3:]).all()) and float(areas.mean()) < 0.6 * float(trivial[3:].mean()), runs
    assert float(mae[age]) < 0.6 * float(trivial[age]), runs


def test_state_dict_round_trip_and_config_errors() -> None:
    images, parents = disks(4, 32, seed=5)
    info = make_info(parents)
    torch.manual_seed(0)
    reg = build(CNNRegressorConfig(), info).eval()
    buf = io.BytesIO()
    torch.save(reg.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = build(CNNRegressorConfig(), info).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(reg(images)["loc"], other(images)["loc"])
    with pytest.raises(ConfigError, match="groups=3"):
        build(CNNRegressorConfig(groups=3), info)
    with pytest.raises(ConfigError, match="max_width >= width"):
        build(CNNRegressorConfig(width=32, max_width=16), info)
    with torch.no_grad():
        assert math.isfinite(float(reg.nll(images, info.normalise(parents)).sum()))


COND_VARIABLES = [
    Variable("size", "continuous"),
    Variable("disk_area", "continuous", ("size",), "px", Measure("disk")),
]


def sized_disks(
    n: int, size: int, seed: int, area: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disks whose area follows a global cue: a frame whose brightness is the subject's size, and
    area = 60 (1 + size) (1 + 0.25 e). Returns images, parents (size, area) and the exogenous draws
    so that ``area`` re-renders the same subjects with other areas (their exact counterfactuals)."""
    g = torch.Generator().manual_seed(seed)
    subj = torch.rand(n, generator=g)
    noise = 0.25 * torch.randn(n, generator=g)
    centre = (torch.rand(2, n, generator=g) * 0.2 + 0.4) * size
    pixel = 0.05 * torch.randn(n, size, size, generator=g)
    if area is None:
        area = 60.0 * (1.0 + subj) * (1.0 + noise)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    r2 = area / math.pi
    disk = (yy - centre[0, :, None, None]) ** 2 + (xx - centre[1, :, None, None]) ** 2 < r2[:, None, None]
    img = torch.full((n, size, size), -0.8)
    img[:, :3, :] = subj[:, None, None] - 0.5
    img = torch.where(disk, torch.tensor(0.6), img) + pixel
    parents = torch.stack([subj, disk.flatten(1).sum(1).float()], dim=1)
    return img.clamp(-1, 1)[:, None], parents, area


def test_conditioned_heads_read_only_their_parents() -> None:
    _, parents, _ = sized_disks(16, 32, seed=0)
    info = make_info_for(COND_VARIABLES, parents)
    torch.manual_seed(0)
    reg = build(CNNRegressorConfig(width=8, dropout=0.0), info).eval()
    x = torch.randn(4, 1, 32, 32)
    pa = info.normalise(parents[:4])
    with torch.no_grad():
        base = reg(x, pa)["loc"]
        moved = pa.clone()
        moved[:, 1] += 3.0  # the area is no parent of either variable
        assert torch.equal(reg(x, moved)["loc"], base)
        moved = pa.clone()
        moved[:, 0] += 3.0  # size is the area's parent, and its own head reads no parent
        out = reg(x, moved)["loc"]
        assert torch.equal(out[:, 0], base[:, 0]) and not torch.allclose(out[:, 1], base[:, 1])
        # without parents, the area's head is given the regressor's own estimate of size
        own = reg(x)["loc"]
        given = pa.clone()
        given[:, 0] = own[:, 0]
        torch.testing.assert_close(own, reg(x, given)["loc"])
        flat = build(CNNRegressorConfig(width=8, condition=False), info).eval()
        assert torch.equal(flat(x, moved)["loc"], flat(x, pa)["loc"])


def make_info_for(variables: list[Variable], parents: torch.Tensor) -> DatasetInfo:
    return DatasetInfo(
        name="sized-disks",
        spatial_dims=2,
        shape=(32, 32),
        spacing=(1.0, 1.0),
        structures={1: "disk"},
        variables=variables,
        normalisation=fit_normalisation(variables, parents.tolist()),
    )


def test_conditioned_regressor_follows_exact_counterfactuals() -> None:
    """The slope of the predicted area change against the true change between images and their
    exact counterfactuals (the same subjects re-rendered with permuted areas), median over three
    seeds after 300 steps, against what a broken model scores: the image-only mean predictor
    changes nothing (slope 0), and a model reading only the global cue would not either."""
    images, parents, _ = sized_disks(512, 32, seed=1)
    info = make_info_for(COND_VARIABLES, parents)
    targets = info.normalise(parents)
    test_images, test_parents, area = sized_disks(128, 32, seed=2)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    cf_images, cf_parents, _ = sized_disks(128, 32, seed=2, area=area[perm])
    pa, pa_cf = info.normalise(test_parents), info.normalise(cf_parents)
    true = pa_cf[:, 1] - pa[:, 1]
    trivial = targets.mean(0).expand(128, -1)  # the mean predictor: the same on x and x_cf
    assert float((trivial[:, 1] - trivial[:, 1]).abs().max()) == 0.0
    slopes = []
    for seed in range(3):
        torch.manual_seed(seed)
        reg = build(CNNRegressorConfig(width=8, dropout=0.0), info)
        train(reg, images, targets, steps=300, lr=1e-3)
        with torch.no_grad():
            moved = reg(cf_images, pa_cf)["loc"][:, 1] - reg(test_images, pa)["loc"][:, 1]
        slopes.append(float((true * moved).sum() / (true * true).sum()))
    slope = sorted(slopes)[1]
    assert slope > 0.8, slopes
