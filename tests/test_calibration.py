"""The regressor's calibration: the attenuation fitted on held-out data, the calibrated reading,
and how runs store and read it."""

from __future__ import annotations

import pytest
import torch
from _toy_run import INFO, ToyPhantom
from torch import nn

from segcft.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from segcft.components import build_component, build_dataset
from segcft.config import load_run_config
from segcft.errors import UserError
from segcft.models.calibration import MIN_ATTENUATION, CalibratedRegressor, calibration_problem, fit_calibration
from segcft.run import regressor_reader
from segcft.train import run_training

pytestmark = pytest.mark.usefixtures("one_thread_module")

AGE, BLOB, SPOT = 0, 1, 2  # the toy variables; blob_area's parent is age


def true_parents(x: torch.Tensor) -> torch.Tensor:
    """The toy image's normalised (age, blob, spot) read back exactly: areas by pixel count;
    age is not in the image, so the fake regressors below take it from their parents."""
    px = INFO.spacing[0] * INFO.spacing[1]
    blob = (x > 0.75).flatten(1).sum(1).double() * px
    spot = ((x > 0.25) & (x < 0.75)).flatten(1).sum(1).double() * px
    phys = torch.stack([torch.full_like(blob, 50.0), blob, spot], dim=1)
    return INFO.normalise(phys).float()


class ShrinkingRegressor(nn.Module):
    """A regressor whose blob reading shrinks towards what age predicts: loc_blob = s * blob +
    0.4 * age + 0.1 (normalised), spot read as s_spot * spot; age passed through from its parents."""

    spatial_dims = 2

    def __init__(self, s: float, s_spot: float) -> None:
        super().__init__()
        self.s, self.s_spot = s, s_spot

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        assert parents is not None
        read = true_parents(x)
        loc = torch.stack(
            [parents[:, AGE], self.s * read[:, BLOB] + 0.4 * parents[:, AGE] + 0.1, self.s_spot * read[:, SPOT]], 1
        )
        return {"loc": loc, "scale": torch.full_like(loc, 0.5)}


def test_fit_recovers_the_attenuation_and_the_reading_follows_the_truth():
    val = ToyPhantom("val", n=120)
    reg = ShrinkingRegressor(s=0.5, s_spot=0.1)
    cal = fit_calibration(reg, val, INFO, torch.device("cpu"))
    # the image holds each area to a whole pixel (4 mm^2), the parents do not: fits to about 1 %
    assert cal["attenuation"][BLOB] == pytest.approx(0.5, abs=0.01)
    assert cal["weight"][BLOB, AGE] == pytest.approx(0.4, abs=0.01) and cal["bias"][BLOB] == pytest.approx(
        0.1, abs=0.01
    )
    assert cal["weight"][BLOB, SPOT] == 0  # not a parent of blob_area
    # spot is fitted but read too faintly to divide (0.1 < MIN_ATTENUATION); age has no parents and is read exactly
    assert cal["fitted"].tolist() == [True, True, True]
    assert cal["calibrated"].tolist() == [True, True, False] and 0.1 < MIN_ATTENUATION
    assert cal["attenuation"][SPOT] == pytest.approx(0.1, abs=0.01)
    reader = CalibratedRegressor(reg, cal, INFO)
    test = ToyPhantom("test", n=30)
    batch = [test[i] for i in range(30)]
    x, pa = torch.stack([b["image"] for b in batch]), torch.stack([b["parents"] for b in batch])
    out = reader(x, pa)
    torch.testing.assert_close(out["loc"][:, BLOB], pa[:, BLOB], atol=0.1, rtol=0)  # half a pixel: 0.04
    torch.testing.assert_close(out["scale"][:, BLOB], 0.5 / cal["attenuation"][BLOB].expand(30))
    torch.testing.assert_close(out["loc"][:, SPOT], reg(x, pa)["loc"][:, SPOT])  # left as read
    # the raw reading moves by s of a change of blob; the calibrated one by all of it
    exo, phys = test.exo, test.pa.clone()
    phys_cf = phys.clone()
    phys_cf[:, BLOB] = phys[:, BLOB].flip(0)
    x_cf, _, _ = test.render(exo, phys_cf)
    pa_cf = INFO.normalise(phys_cf).float()
    d_true = pa_cf[:, BLOB] - pa[:, BLOB]
    d_raw = reg(x_cf, pa_cf)["loc"][:, BLOB] - reg(x, pa)["loc"][:, BLOB]
    d_cal = reader(x_cf, pa_cf)["loc"][:, BLOB] - out["loc"][:, BLOB]
    assert float((d_raw * d_true).sum() / (d_true**2).sum()) == pytest.approx(0.5, abs=0.02)
    assert float((d_cal * d_true).sum() / (d_true**2).sum()) == pytest.approx(1.0, abs=0.04)
    # gradients through the reading stay finite in every column, divided or not
    pa_g = pa.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reader(x, pa_g)["loc"].sum(), pa_g)
    assert torch.isfinite(grad).all()


def test_an_empty_or_tiny_split_fits_nothing():
    reg = ShrinkingRegressor(s=0.5, s_spot=0.5)
    for n in (0, 3):
        cal = fit_calibration(reg, ToyPhantom("val", n=n), INFO, torch.device("cpu"))
        assert not cal["fitted"].any() and not cal["calibrated"].any()
        reader = CalibratedRegressor(reg, cal, INFO)
        x = torch.stack([ToyPhantom("test", n=4)[i]["image"] for i in range(4)])
        pa = torch.stack([ToyPhantom("test", n=4)[i]["parents"] for i in range(4)])
        torch.testing.assert_close(reader(x, pa)["loc"], reg(x, pa)["loc"])


def smoke(*overrides: str):
    return load_run_config(None, "smoke", list(overrides))


@pytest.mark.timeout(120)
def test_the_regressor_stage_stores_its_calibration_and_fine_tuning_checks_it_first(tmp_path, capsys):
    cfg = smoke("cft.modes=[none,reg]", "evaluate.n=4")
    on = smoke("cft.modes=[none,reg]", "evaluate.n=4", "cft.calibrate_regressor=true")
    run_training(on, tmp_path, only=["mechanisms", "regressor"])
    out = capsys.readouterr().out
    assert "[regressor] attenuation on " in out
    path = tmp_path / "checkpoints" / "regressor.pt"
    state = load_checkpoint(path)
    cal = state["calibration"]
    assert set(cal) == {"attenuation", "weight", "bias", "fitted", "calibrated"} and cal["fitted"].any()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(h.startswith("attenuation/") for h in header)
    module = build_component("regressor", cfg.regressor, INFO_OF(cfg))
    load_model_state(module, state, path, "regressor")
    assert regressor_reader(module, state, cfg, INFO_OF(cfg), path) is module  # off by default: the paper's Reg-CFT
    assert isinstance(regressor_reader(module, state, on, INFO_OF(cfg), path), CalibratedRegressor)
    # a regressor checkpoint from before calibrations: with the calibration on, fine-tuning says
    # what to do, in one line, before anything trains
    save_checkpoint(path, {"model": state["model"]})
    with pytest.raises(UserError, match=r"has no calibration.*--only regressor.*calibrate_regressor=false"):
        run_training(on, tmp_path, only=["cft-reg"])
    assert not (tmp_path / "checkpoints" / "generator.pt").is_file()


def INFO_OF(cfg):  # noqa: N802 - reads like the constant it stands for
    return build_dataset(cfg, "train").info


def test_evaluation_reports_the_calibrated_reading_beside_the_raw_one(tmp_path):
    from _toy_run import make_toy_run

    from segcft.evaluation import evaluate

    toy_run = make_toy_run()
    toy_run.regressor = ShrinkingRegressor(s=0.5, s_spot=0.1)
    toy_run.regressor_calibration = fit_calibration(
        toy_run.regressor, ToyPhantom("val", n=120), INFO, torch.device("cpu")
    )
    res = evaluate(toy_run, tmp_path, figures=False)["regressor"]
    assert res["calibration"] is True and res["reg_cft_reads"] == "raw"
    blob, spot = res["variables"]["blob_area"], res["variables"]["spot_area"]
    assert blob["exact_slope"] == pytest.approx(0.5, abs=0.03)
    assert blob["calibrated_exact_slope"] == pytest.approx(1.0, abs=0.05)
    assert blob["attenuation"] == pytest.approx(0.5, abs=0.01) and blob["calibrated"] is True
    assert spot["calibrated"] is False and spot["calibrated_exact_slope"] == pytest.approx(spot["exact_slope"])
    report = (tmp_path / "report.md").read_text()
    assert "| variable | correlation | slope on exact counterfactuals | calibrated slope | attenuation |" in report
    assert "Reg-CFT acted on the raw prediction" in report
    toy_run.config.cft.calibrate_regressor = True
    assert evaluate(toy_run, tmp_path / "on", figures=False)["regressor"]["reg_cft_reads"] == "calibrated"


def test_a_calibration_that_does_not_fit_the_variables_is_named():
    good = fit_calibration(ShrinkingRegressor(s=0.5, s_spot=0.5), ToyPhantom("val", n=40), INFO, torch.device("cpu"))
    assert calibration_problem(good, 3) is None
    assert calibration_problem(None, 3) == "it has no calibration"
    assert "lacks bias" in calibration_problem({k: v for k, v in good.items() if k != "bias"}, 3)
    assert "expected" in calibration_problem(good, 4)
