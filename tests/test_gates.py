"""Quality gates: the segmentor gate of ``segcft train`` (retry, stop, warn) and the checks of
every evaluation (generator responsiveness, the regressor's correlation and exact-counterfactual
slope, marks on numbers measured by a segmentor with a large floor), each against a model that
has learned nothing and one that is exact by construction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segcft.evaluation.checks import DAGGER, SLOPE_WARN
from segcft.evaluation.quality import not_learned, segmentor_quality
from segcft.metrics import dice_scores

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


# -- helpers: models that ignore what they should follow ----------------------------------------
class SpotBlindSegmentor(nn.Module):
    """The exact toy segmentor, except that it never finds the spot (labels it background)."""

    classes = ("background", "blob", "spot")
    spatial_dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.where(x[:, 0] > 0.75, 1, 0)
        return 40.0 * nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()


def _prior_mean_generators():
    """An oracle whose prior-mean decode renders the parents, and one whose decode ignores them."""
    from _toy_run import INFO, IdentityGenerator, OracleGenerator, render

    class PriorOracle(OracleGenerator):
        def sample(self, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
            return render(torch.zeros(pa.shape[0], 1), INFO.denormalise(pa.double()))[0]

    class PriorIgnorant(IdentityGenerator):
        def sample(self, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
            return -torch.ones(pa.shape[0], 1, 16, 16)

    return {"ignores": PriorIgnorant(), "follows": PriorOracle()}


class ExactRegressor(nn.Module):
    """Reads the structure areas off the toy images (pixel counts) and predicts age from the blob."""

    spatial_dims = 2

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        from _toy_run import AGE_SLOPE, INFO

        px = 4.0
        blob = (x[:, 0] > 0.75).flatten(1).sum(1).double() * px
        spot = ((x[:, 0] > 0.25) & (x[:, 0] <= 0.75)).flatten(1).sum(1).double() * px
        age = 50 + (blob - 300) / AGE_SLOPE
        loc = INFO.normalise(torch.stack([age, blob, spot], 1)).float()
        return {"loc": loc, "scale": torch.ones_like(loc)}


@pytest.fixture()
def toy_run():
    from _toy_run import make_toy_run

    run = make_toy_run()
    run.config.evaluate.responsiveness_n = 4
    return run


# -- segmentor quality -------------------------------------------------------------------------
def test_dice_scores_known_values():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    true = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    d = dice_scores(pred, true)
    assert d[0].item() == pytest.approx(2 / 3) and torch.isnan(d[1]) and d[2].item() == 0.0


def test_segmentor_quality_exact_and_blind():
    from _toy_run import INFO, ThresholdSegmentor, ToyPhantom

    data = ToyPhantom("val")
    exact = segmentor_quality(ThresholdSegmentor(), data, INFO, torch.device("cpu"))
    assert set(exact) == {"blob_area", "spot_area"}
    for q in exact.values():
        assert q["dice"] == pytest.approx(1.0) and q["mape"] < 1e-6
    assert not_learned(exact, 0.7, 20.0) == []
    blind = segmentor_quality(SpotBlindSegmentor(), data, INFO, torch.device("cpu"))
    assert blind["spot_area"]["dice"] == 0.0 and blind["spot_area"]["mape"] == pytest.approx(100.0)
    assert blind["blob_area"]["dice"] == pytest.approx(1.0)
    assert not_learned(blind, 0.7, 20.0) == ["spot_area"]
    assert not_learned(blind, 0.7, 0.0) == ["spot_area"]  # Dice alone
    assert not_learned(blind, 0.0, 20.0) == ["spot_area"]  # MAPE alone
    assert not_learned(blind, 0.0, 0.0) == []  # gate off


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segcft", "train", "--preset", "smoke", "--device", "cpu", "--run-dir", str(run_dir)]
    gate = ["--set", "train.segmentor.gate_dice=0.7", "--set", "train.segmentor.gate_mape=20",
            "--set", "train.segmentor.steps=1"]  # fmt: skip
    return subprocess.run([*cmd, *gate, *extra], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(400)
def test_gate_retries_then_stops_and_warn_goes_on_with_marks(tmp_path):
    """A one-step segmentor has learned no structure: the gate retries it once (another seed,
    twice the steps), then stops with one line and exit 2; resumed with gate=warn the run goes on
    and marks every number the unlearned segmentor measured; a finished gate is not redone."""
    res = _train(tmp_path, "--only", "segmentor")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: segmentor 'segmentor' has not learned structure '")
    assert "Dice >= 0.70" in err[0] and "MAPE <= 20.0 %" in err[0] and "soft-area MAPE" in err[0]
    assert "[segmentor-retry]" in res.stdout and "seed 1000 and 2 steps" in res.stdout
    gate = json.loads((tmp_path / "gates.json").read_text())["segmentor"]
    assert gate["status"] == "not learned" and gate["not_learned"]
    assert [(a["seed"], a["steps"]) for a in gate["attempts"]] == [(0, 1), (1000, 2)]
    assert not (tmp_path / "checkpoints" / "segmentor.pt").exists()

    res = _train(tmp_path, "--resume", "auto", "--set", "train.segmentor.gate=warn")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning: segmentor 'segmentor' has not learned" in res.stdout
    assert "warning: segmentor 'eval_segmentor' has not learned" in res.stdout
    from segcft.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoints" / "segmentor.pt")["seed"] == 1000
    assert load_checkpoint(tmp_path / "checkpoints" / "eval_segmentor.pt")["seed"] == 1001
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    marked = metrics["floor_marks"]["segmentors"]
    assert set(marked) == {"eval", "guide"} and all(m["split"] == "val" for m in marked["eval"].values())
    floors = json.loads((tmp_path / "gates.json").read_text())["eval_segmentor"]["floors"]
    for s, m in marked["eval"].items():
        assert m["floor"] == pytest.approx(floors[s]) and m["floor"] > 20.0
    report = (tmp_path / "report.md").read_text()
    assert "## Marks" in report and f"{DAGGER} " in report and "soft-area error on factual val images" in report
    headline = [line for line in res.stdout.splitlines() if line.startswith("do(")]
    assert headline and all(DAGGER in line for line in headline)

    res = _train(tmp_path, "--resume", "auto", "--set", "train.segmentor.gate=warn")
    assert res.returncode == 0 and "not learned" not in res.stdout and "[segmentor] done" in res.stdout


def test_marks_follow_the_floors(tmp_path, toy_run):
    """Numbers measured by a segmentor that misses a structure carry a dagger and a footnote;
    the floors recorded in the run folder's gates.json take precedence; threshold 0: no marks."""
    from segcft.evaluation import evaluate
    from segcft.evaluation.report import console_headline

    toy_run.eval_segmentor = SpotBlindSegmentor()
    res = evaluate(toy_run, tmp_path / "a", figures=False)
    marks = res["floor_marks"]["segmentors"]
    assert list(marks) == ["eval"] and list(marks["eval"]) == ["spot_area"]
    assert marks["eval"]["spot_area"]["floor"] == pytest.approx(100.0) and marks["eval"]["spot_area"]["split"] == "test"
    report = (tmp_path / "a" / "report.md").read_text()
    assert "spot_area (evaluation segmentor): measured by a segmentor whose soft-area error" in report
    lines = console_headline(res)
    spot = next(line for line in lines if line.startswith("do(spot_area)"))
    blob = next(line for line in lines if line.startswith("do(blob_area)"))
    assert f"%{DAGGER}, leakage" in spot and f"%{DAGGER}, outside" in blob and f"%{DAGGER}, leakage" not in blob

    toy_run.eval_segmentor = SpotBlindSegmentor()
    toy_run.run_dir = tmp_path / "b"
    toy_run.run_dir.mkdir()
    (toy_run.run_dir / "gates.json").write_text(json.dumps({"eval_segmentor": {"floors": {"blob_area": 45.0}}}))
    res = evaluate(toy_run, tmp_path / "b", figures=False)
    assert res["floor_marks"]["segmentors"]["eval"]["blob_area"] == {"floor": 45.0, "split": "val"}
    assert "45.0 % for this structure" in (tmp_path / "b" / "report.md").read_text()

    toy_run.config.evaluate.floor_mark = 0.0
    res = evaluate(toy_run, tmp_path / "c", figures=False)
    assert res["floor_marks"]["segmentors"] == {} and DAGGER not in (tmp_path / "c" / "report.md").read_text()


# -- generator responsiveness and the regressor -----------------------------------------------
def test_responsiveness_separates_a_generator_that_follows_from_one_that_ignores(tmp_path, toy_run):
    from segcft.evaluation import evaluate

    toy_run.generators = _prior_mean_generators()
    res = evaluate(toy_run, tmp_path, figures=False)
    resp = res["responsiveness"]
    for name in ("blob_area", "spot_area"):
        assert resp["follows"][name]["abducted"] == pytest.approx(1.0, abs=0.1)
        assert resp["follows"][name]["prior_mean"] == pytest.approx(1.0, abs=0.1)
        assert abs(resp["ignores"][name]["abducted"]) < 1e-9 and abs(resp["ignores"][name]["prior_mean"]) < 1e-9
        assert resp["follows"][name]["images"] == 4
    warned = " ".join(res["warnings"])
    assert "'ignores' barely responds to blob_area" in warned and "'ignores' barely responds to spot_area" in warned
    assert "'follows'" not in warned and SLOPE_WARN == 0.5
    report = (tmp_path / "report.md").read_text()
    assert "## Responsiveness" in report and "## Warnings" in report
    toy_run.config.evaluate.responsiveness_n = 0
    assert evaluate(toy_run, tmp_path / "off", figures=False)["responsiveness"] == {}


def test_responsiveness_tells_the_decoder_mean_from_the_abducted_pixel_noise(tmp_path, toy_run):
    """A generator whose decoder mean re-renders the subject exactly but whose abducted latent
    misreads the background (0.5 too bright), so the pixel noise u = x - mu holds -0.5 outside
    the structures: new structure pixels come out at mu* - 0.5 and are not counted, removed ones
    are. The decoder-mean slope reads 1; the counterfactual's, which keeps the factual outline
    where the structure grows, falls well under it and is warned with the mean's beside it."""
    from _toy_run import OracleGenerator

    from segcft.evaluation import evaluate

    class Misfit(OracleGenerator):
        def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
            return super().abduct(x, pa) + 0.5

    toy_run.generators = {"misfit": Misfit(), "exact": _prior_mean_generators()["follows"]}
    res = evaluate(toy_run, tmp_path, figures=False)
    resp = res["responsiveness"]
    for name in ("blob_area", "spot_area"):
        assert resp["misfit"][name]["abducted_mean"] == pytest.approx(1.0, abs=0.05)
        assert resp["misfit"][name]["abducted"] < 0.6  # 0.41-0.42: new pixels read as background
        assert resp["exact"][name]["abducted_mean"] == pytest.approx(resp["exact"][name]["abducted"], abs=1e-9)
    assert "slope (abducted, decoder mean)" in (tmp_path / "report.md").read_text()
    low = [w for w in res["warnings"] if "'misfit'" in w]
    assert len(low) == 2 and all("on their decoder mean alone" in w for w in low)
    assert not any("'exact'" in w for w in res["warnings"])


def test_responsiveness_goes_through_the_models_one_evaluation_batch_at_a_time(tmp_path, toy_run):
    """Sixteen subjects of 3D volumes at once can exhaust memory: the check abducts and decodes
    no more subjects at a time than the evaluation's batch, with the same slopes."""
    from segcft.evaluation import evaluate

    seen: list[int] = []
    gens = _prior_mean_generators()
    for g in gens.values():
        for name in ("abduct", "decode", "sample"):
            f = getattr(g, name)
            setattr(g, name, lambda *a, _f=f, **k: (seen.append(int(a[0].shape[0])), _f(*a, **k))[1])
    toy_run.generators = gens
    toy_run.config.evaluate.responsiveness_n = 12
    toy_run.config.cft.batch_size = 64
    whole = evaluate(toy_run, tmp_path / "whole", figures=False)["responsiveness"]
    assert max(seen) >= 12
    seen.clear()
    toy_run.config.cft.batch_size = 5
    chunked = evaluate(toy_run, tmp_path / "chunked", figures=False)["responsiveness"]
    assert seen and max(seen) <= 5
    for mode, entry in whole.items():
        for name, r in entry.items():
            assert chunked[mode][name]["images"] == r["images"] == 12
            for kind in ("abducted", "abducted_mean", "prior_mean"):
                assert chunked[mode][name][kind] == pytest.approx(r[kind], abs=1e-9)


def test_regressor_section_correlation_and_exact_slope(tmp_path, toy_run):
    from segcft.evaluation import evaluate

    toy_run.regressor = ExactRegressor()
    reg = evaluate(toy_run, tmp_path / "exact", figures=False)["regressor"]
    assert reg["split"] == "test" and reg["n"] == 40
    for name in ("blob_area", "spot_area"):
        assert reg["variables"][name]["correlation"] > 0.99
        assert reg["variables"][name]["exact_slope"] == pytest.approx(1.0, abs=0.05)
    from _toy_run import ZeroRegressor

    toy_run.regressor = ZeroRegressor()
    res = evaluate(toy_run, tmp_path / "zero", figures=False)
    for e in res["regressor"]["variables"].values():
        assert e["correlation"] is None and e["exact_slope"] == 0.0
    assert "## Regressor" in (tmp_path / "zero" / "report.md").read_text()


@pytest.mark.timeout(300)
def test_stopped_gate_resumed_with_warn_equals_a_straight_run(tmp_path, capsys):
    """The resume states of both attempts survive the stop; resumed with gate=warn the stage
    continues from them and keeps the same weights as a run that warned straight away, and no
    resume state is left behind."""
    from segcft.checkpoint import load_checkpoint
    from segcft.config import load_run_config
    from segcft.train import run_training
    from segcft.train.gate import SegmentorNotLearned

    base = ["train.segmentor.gate_dice=0.7", "train.segmentor.gate_mape=20", "train.segmentor.steps=2",
            "train.segmentor.checkpoint_every=1"]  # fmt: skip
    stopped = tmp_path / "stopped"
    with pytest.raises(SegmentorNotLearned, match="segmentor 'segmentor' has not learned"):
        run_training(load_run_config(None, "smoke", base), stopped, only=["segmentor"])
    ckpt = stopped / "checkpoints"
    assert (ckpt / "segmentor.last.pt").is_file() and (ckpt / "segmentor-retry.last.pt").is_file()
    warn = load_run_config(None, "smoke", [*base, "train.segmentor.gate=warn"])
    capsys.readouterr()
    run_training(warn, stopped, only=["segmentor"], resume="auto")
    out = capsys.readouterr().out
    assert "[segmentor-retry] resuming from" in out and "[segmentor] resuming from" in out
    straight = tmp_path / "straight"
    run_training(warn, straight, only=["segmentor"])
    a = load_checkpoint(ckpt / "segmentor.pt")
    b = load_checkpoint(straight / "checkpoints" / "segmentor.pt")
    assert a["seed"] == b["seed"] == 1000
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert not list(ckpt.glob("*.last.pt"))
    gates = [json.loads((d / "gates.json").read_text())["segmentor"] for d in (stopped, straight)]
    assert gates[0] == gates[1] and gates[0]["status"] == "not learned"


@pytest.mark.timeout(120)
def test_an_imported_segmentor_goes_through_the_gate(tmp_path):
    """--segmentor-checkpoint with a segmentor that has learned nothing (freshly initialised):
    measured on the validation split like a trained one, recorded in gates.json with its source,
    and the run stops with one line naming the file before any later stage trains; with
    ``gate: warn`` the run goes on."""
    from segcft.components import build_component, build_dataset
    from segcft.config import load_run_config
    from segcft.train import run_training
    from segcft.train.gate import SegmentorNotLearned

    cfg = load_run_config(None, "smoke", ["train.segmentor.gate_dice=0.7", "train.segmentor.gate_mape=20"])
    torch.manual_seed(0)
    info = build_dataset(cfg, "train").info
    untrained = build_component("segmentor", cfg.segmentor, info)
    path = tmp_path / "untrained.pt"
    torch.save({"model": untrained.state_dict()}, path)
    with pytest.raises(SegmentorNotLearned, match=r"imported from .*untrained\.pt \(--segmentor-checkpoint\) has not"):
        run_training(cfg, tmp_path / "run", only=["segmentor"], segmentor_checkpoint=path)
    gate = json.loads((tmp_path / "run" / "gates.json").read_text())["segmentor"]
    assert gate["status"] == "not learned" and gate["attempts"][0]["source"] == str(path)
    assert not (tmp_path / "run" / "checkpoints" / "segmentor.pt").exists()
    warn = load_run_config(None, "smoke", ["train.segmentor.gate_dice=0.7", "train.segmentor.gate=warn"])
    run_training(warn, tmp_path / "warned", only=["segmentor"], segmentor_checkpoint=path)
    assert (tmp_path / "warned" / "checkpoints" / "segmentor.pt").exists()
    assert json.loads((tmp_path / "warned" / "gates.json").read_text())["segmentor"]["status"] == "not learned"


@pytest.mark.timeout(400)
def test_eval_steps_train_the_evaluation_segmentor_alone_longer(tmp_path):
    """train.segmentor.eval_steps sets the evaluation segmentor's steps (its retry doubles them),
    the guide keeps train.segmentor.steps, and the time estimate counts each stage's own steps."""
    res = _train(tmp_path, "--only", "segmentor", "--only", "eval_segmentor", "--set", "train.segmentor.gate=warn",
                 "--set", "train.segmentor.eval_steps=3")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert [a["steps"] for a in gates["segmentor"]["attempts"]] == [1, 2]
    # a 3-step segmentor has not learned the smoke data either: retried with twice its own steps
    assert [a["steps"] for a in gates["eval_segmentor"]["attempts"]] == [3, 6]

    from segcft.config import load_run_config
    from segcft.train.progress import stage_units

    cfg = load_run_config(tmp_path / "config.yaml")
    assert cfg.train.segmentor.eval_steps == 3
    guide, _ = stage_units(cfg, "segmentor", 0)
    grader, _ = stage_units(cfg, "eval_segmentor", 0)
    assert grader == pytest.approx(3 * guide)


@pytest.mark.timeout(400)
def test_eval_segmentor_parameters_make_a_wider_instrument_than_the_guide(tmp_path):
    """``eval_segmentor`` sets the evaluation segmentor's own parameters on top of ``segmentor``'s:
    it trains, is gated, saved, loaded and evaluated at its width while the guide keeps its own;
    the time estimate prices it at its width; a key the segmentor lacks is one line naming it."""
    from segcft.config import component_section, load_run_config
    from segcft.errors import ConfigError
    from segcft.run import load_run
    from segcft.train import run_training
    from segcft.train.progress import WIDTH_COST_EXPONENT, stage_units

    cfg = load_run_config(None, "smoke", ["eval_segmentor.channels=[8,16,32]", "cft.modes=[none]"])
    assert list(component_section(cfg, "segmentor", "eval_segmentor").params.channels) == [8, 16, 32]
    assert list(component_section(cfg, "segmentor", "segmentor").params.channels) == [4, 8, 16]
    run_training(cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert size(run.eval_segmentor) > 3 * size(run.segmentor)
    gates = json.loads((tmp_path / "run" / "gates.json").read_text())
    assert set(gates["eval_segmentor"]["floors"]) == set(gates["segmentor"]["floors"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 4
    guide, _ = stage_units(cfg, "segmentor", 0)
    grader, _ = stage_units(cfg, "eval_segmentor", 0)
    assert grader == pytest.approx(guide * 2**WIDTH_COST_EXPONENT, rel=1e-3)  # twice the channels: 1.5 x the time

    # the stored config reads back with the parameters; a misspelt one names itself
    assert load_run_config(tmp_path / "run" / "config.yaml", None).eval_segmentor == {"channels": [8, 16, 32]}
    with pytest.raises(ConfigError, match=r"eval_segmentor: unknown key 'chanels'; did you mean 'channels'"):
        load_run_config(None, "smoke", ["eval_segmentor.chanels=[8,16,32]"])
    with pytest.raises(ConfigError, match=r"eval_segmentor\.name: the evaluation segmentor is the segmentor"):
        load_run_config(None, "smoke", ["eval_segmentor.name=unet"])
    # a value the plugin itself refuses stops the run before any stage trains, naming eval_segmentor
    with pytest.raises(ConfigError, match=r"eval_segmentor \{'channels': \[8\]\}: .*at least two"):
        run_training(load_run_config(None, "smoke", ["eval_segmentor.channels=[8]"]), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints" / "segmentor.pt").exists()
    # an empty mapping clears what the preset's 3D overlay set: the guide's parameters again
    plain = load_run_config(None, "quick", ["dataset.name=ccta-phantom", "eval_segmentor={}"])
    assert plain.eval_segmentor == {} and component_section(plain, "segmentor", "eval_segmentor") is plain.segmentor
