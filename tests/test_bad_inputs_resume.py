"""Interrupted runs and damaged run folders: resume is bitwise exact for every stage (one process
and two gloo ranks); a torn metrics.csv, checkpoints of the wrong model or truncated ones, a
non-finite what-if and ``--only`` with ``--segmentor-checkpoint`` give one clear line."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from segcft.checkpoint import load_checkpoint
from segcft.config import load_run_config
from segcft.train import run_training
from segcft.train.context import StageContext

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# Every fitted stage takes 4 steps and leaves a resume checkpoint after each one; a kill at the
# second checkpoint (after step 2) leaves the one of step 1, so a resume redoes step 2.
OVERRIDES = [
    "device=cpu", "cft.modes=[none,reg,seg]", "cft.steps=4", "cft.checkpoint_every=1",
    *(f"train.{s}.{k}" for s in ("segmentor", "regressor", "generator") for k in ("steps=4", "checkpoint_every=1")),
]
FITTED = ["segmentor", "eval_segmentor", "regressor", "generator", "cft-reg", "cft-seg"]


def smoke(*overrides: str):
    return load_run_config(None, "smoke", [*OVERRIDES, *overrides])


class Killed(Exception):
    """Stands for a SIGKILL: the process stops without saving anything more."""


@contextmanager
def killed_at_second_checkpoint(stage: str) -> Iterator[None]:
    """Raise ``Killed`` where ``stage`` would save its second resume checkpoint (or, for a stage
    without resume checkpoints, its final one); on every rank alike."""
    save_last, save_final = StageContext.save_last, StageContext.save_final
    calls = []

    def last(self, name, *args, **kwargs):
        if name == stage:
            calls.append(name)
            if len(calls) == 2:
                raise Killed(stage)
        return save_last(self, name, *args, **kwargs)

    def final(self, name, *args, **kwargs):
        if name == stage:
            raise Killed(stage)
        return save_final(self, name, *args, **kwargs)

    StageContext.save_last, StageContext.save_final = last, final
    try:
        yield
    finally:
        StageContext.save_last, StageContext.save_final = save_last, save_final


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder with every stage but evaluation trained without interruption."""
    run_dir = tmp_path_factory.mktemp("trained")
    cfg = smoke()
    from segcft.train import stage_names

    run_training(cfg, run_dir, only=[s for s in stage_names(cfg) if s != "evaluate"])
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key in ("model", "calibration"):  # dicts of tensors
            assert sa[key].keys() == sb[key].keys()
            for k in sa[key]:
                assert torch.equal(sa[key][k], sb[key][k]), f"{a.name}: {k} differs"
        else:
            assert sa[key] == sb[key], f"{a.name}: {key} differs"


def _rows(run_dir: Path, stage: str) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == stage]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", ["mechanisms", *FITTED])
def test_resume_after_kill_is_bitwise_exact(trained, tmp_path, stage):
    """Killed mid-stage, then ``resume="auto"``: the stage's final checkpoint (weights, eps,
    lambda) and its metrics rows equal those of the uninterrupted run bit for bit."""
    run_dir = _copy(trained, tmp_path / "run")
    cfg = smoke()
    with killed_at_second_checkpoint(stage), pytest.raises(Killed):
        run_training(cfg, run_dir, only=[stage])
    ck = run_dir / "checkpoints"
    assert not (ck / f"{stage}.pt").exists()
    assert (ck / f"{stage}.last.pt").is_file() == (stage != "mechanisms")
    run_training(cfg, run_dir, only=[stage], resume="auto")
    _assert_same_checkpoint(ck / f"{stage}.pt", trained / "checkpoints" / f"{stage}.pt")
    assert _rows(run_dir, stage) == _rows(trained, stage)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_bad_inputs_resume import Killed, killed_at_second_checkpoint, smoke
    from segcft.train import run_training
    dist.init_process_group("gloo")
    straight, killed, stages = sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    cfg = smoke()
    run_training(cfg, straight, only=stages)
    for i, stage in enumerate(stages):
        try:
            with killed_at_second_checkpoint(stage):
                run_training(cfg, killed, only=stages, resume="auto" if i else None)
        except Killed:
            pass
        else:
            raise SystemExit(f"{stage} was not interrupted")
    run_training(cfg, killed, only=stages, resume="auto")
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(240)
def test_resume_after_kill_is_bitwise_exact_with_two_gloo_ranks(trained, tmp_path):
    """Two gloo ranks, killed during fine-tuning (each rank draws its interventions from its own
    generator and its posterior samples from the global RNG) and resumed: the weights equal
    those of an uninterrupted two-rank run bit for bit."""
    stages = ["cft-seg"]
    straight, killed = _copy(trained, tmp_path / "straight"), _copy(trained, tmp_path / "killed")
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DDP_SCRIPT, str(ROOT / "tests"), str(straight), str(killed), ",".join(stages)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=220)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    for stage in stages:
        _assert_same_checkpoint(killed / "checkpoints" / f"{stage}.pt", straight / "checkpoints" / f"{stage}.pt")


def test_torn_metrics_row_is_dropped_with_one_warning(tmp_path, capsys):
    """metrics.csv whose last row a kill cut mid-append (no line end): the row is dropped with
    one warning, later appends and header rewrites work, and the file reads back cleanly."""
    from segcft.train.metrics_log import MetricsLog

    path = tmp_path / "metrics.csv"
    path.write_text("stage,step,loss\r\ngenerator,2,5.25\r\ngenerator,4,5.1")
    log = MetricsLog(path, True)
    assert capsys.readouterr().err.count("torn row") == 1
    log.log("generator", 4, {"loss": 5.0})  # appended
    log.close()
    log = MetricsLog(path, True)
    log.log("generator", 6, {"loss": 4.9, "kl": 0.1})  # a new column: the file is rewritten
    log.close()
    assert "torn" not in capsys.readouterr().err
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["kl"]) for r in rows] == [("2", "5.25", ""), ("4", "5", ""), ("6", "4.9", "0.1")]


def test_run_folder_files_get_the_umask_mode(trained, tmp_path):
    """Atomically written files get 0o666 under the umask, like plainly created ones (mkstemp's
    0o600 made a run folder unreadable to the group); the run's own files too."""
    from segcft.checkpoint import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    expected = 0o666 & ~old
    for name in ("config.yaml", "dataset.json", "metrics.csv", "checkpoints/generator.pt", "checkpoints/cft-seg.pt"):
        assert (trained / name).stat().st_mode & 0o777 == expected, name
    assert not list(trained.glob("*.tmp")) and not list(trained.glob(".*.tmp"))


def _cli(*args: str):
    from click.testing import CliRunner

    from segcft.cli import cli

    return CliRunner().invoke(cli, list(args), prog_name="segcft")


def _one_line_exit_2(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _save_other_generator(trained: Path, path: Path) -> None:
    """A generator checkpoint from a run whose HVAE has another latent width."""
    import json

    from segcft.checkpoint import save_checkpoint
    from segcft.data.variables import DatasetInfo
    from segcft.components import build_component as _build_component

    info = DatasetInfo.from_dict(json.loads((trained / "dataset.json").read_text()))
    other = _build_component("generator", smoke("generator.z_dim=3").generator, info)
    save_checkpoint(path, {"stage": "generator", "model": other.state_dict(), "eps": 5.0})


def test_evaluate_with_a_generator_of_another_architecture(trained, tmp_path):
    """`segcft evaluate` on a run whose generator.pt comes from an HVAE of another latent width:
    exit 2 with one line naming the file and the weights of another shape."""
    run_dir = _copy(trained, tmp_path / "run")
    _save_other_generator(trained, run_dir / "checkpoints" / "generator.pt")
    _one_line_exit_2(_cli("evaluate", "--run", str(run_dir), "--n", "2"),
                     "generator.pt", "does not fit the generator 'hvae'", "of another shape")


def test_counterfactual_with_a_segmentor_where_a_generator_belongs(trained, tmp_path):
    """`segcft counterfactual` on a run whose cft-seg.pt holds the segmentor's weights: exit 2
    with one line naming the file, the stage it holds and the missing weights; nothing written."""
    run_dir = _copy(trained, tmp_path / "run")
    shutil.copy(run_dir / "checkpoints" / "segmentor.pt", run_dir / "checkpoints" / "cft-seg.pt")
    out = tmp_path / "cf.tif"
    _one_line_exit_2(_cli("counterfactual", "--run", str(run_dir), "--input", "test:0", "--do", "age=60",
                          "--out", str(out)),
                     "cft-seg.pt", "(it holds the 'segmentor' stage)", "missing weights")
    assert not out.exists()


def test_resume_with_a_generator_of_another_architecture(trained, tmp_path):
    """`--resume auto` of a run whose finished generator.pt comes from another architecture:
    one line naming the file, before the fine-tuning stages that read it start (or are reset)."""
    from segcft.errors import UserError

    run_dir = _copy(trained, tmp_path / "run")
    _save_other_generator(trained, run_dir / "checkpoints" / "generator.pt")
    with pytest.raises(UserError, match=r"generator\.pt does not fit the generator 'hvae'") as e:
        run_training(smoke(), run_dir, only=["cft-reg", "cft-seg"], resume="auto")
    assert "\n" not in str(e.value)
    _assert_same_checkpoint(run_dir / "checkpoints" / "cft-reg.pt", trained / "checkpoints" / "cft-reg.pt")


def test_resume_from_the_last_checkpoint_of_another_model(trained, tmp_path):
    """`--resume auto` where generator.last.pt holds another architecture's resume state: one
    line naming the file, before any step is taken."""
    from segcft.errors import UserError

    run_dir = _copy(trained, tmp_path / "run")
    _save_other_generator(trained, run_dir / "checkpoints" / "generator.last.pt")
    with pytest.raises(UserError, match=r"generator\.last\.pt does not fit the generator 'hvae'") as e:
        run_training(smoke(), run_dir, only=["generator"], resume="auto")
    assert "\n" not in str(e.value)


def test_truncated_checkpoint(trained, tmp_path):
    """A generator.pt cut to half its size (a copy interrupted): `segcft evaluate` exits 2 with
    one line naming the file."""
    run_dir = _copy(trained, tmp_path / "run")
    path = run_dir / "checkpoints" / "generator.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _one_line_exit_2(_cli("evaluate", "--run", str(run_dir), "--n", "2"), "generator.pt", "truncated or corrupt")


def test_counterfactual_to_a_non_finite_value(tmp_path):
    """`--do age=1e300`: the value overflows once normalised (float32 parents): one line, and no
    TIFF written (it used to write an all-NaN image and exit 0)."""
    from _toy_run import make_toy_run

    from segcft.errors import UserError
    from segcft.evaluate import counterfactual_with

    out = tmp_path / "cf.tif"
    with pytest.raises(UserError, match=r"--do age: the intended value 1e\+300 years is out of the model's range"):
        counterfactual_with(make_toy_run(), "test:0", ["age=1e300"], out, mode="identity")
    assert not out.exists()


def test_counterfactual_whose_mechanisms_give_non_finite_parents(tmp_path):
    """Mechanisms that overflow on a descendant of the intervened variable: one line naming it;
    nothing written."""
    from _toy_run import LinearSCM, make_toy_run

    from segcft.errors import UserError
    from segcft.evaluate import counterfactual_with

    class Overflowing(LinearSCM):
        def counterfactual(self, pa, interventions):
            out = super().counterfactual(pa, interventions)
            out[:, 1] = float("inf")
            return out

    run = make_toy_run()
    run.mechanisms = Overflowing()
    out = tmp_path / "cf.tif"
    with pytest.raises(UserError, match="the counterfactual value of blob_area is not finite"):
        counterfactual_with(run, "test:0", ["age=60"], out, mode="oracle")
    assert not out.exists()


def test_counterfactual_image_with_nan_pixels(tmp_path):
    """A generator whose counterfactual has NaN pixels: one line naming the mode; nothing written."""
    from _toy_run import IdentityGenerator, make_toy_run

    from segcft.errors import UserError
    from segcft.evaluate import counterfactual_with

    class Broken(IdentityGenerator):
        def counterfactual(self, x, pa, pa_cf, particles=1):
            return torch.full_like(x, float("nan")), None

    run = make_toy_run()
    run.generators["identity"] = Broken()
    out = tmp_path / "cf.tif"
    with pytest.raises(UserError, match="the 'identity' generator's counterfactual image has NaN or infinite pixels"):
        counterfactual_with(run, "test:0", ["age=60"], out, mode="identity")
    assert not out.exists()


def test_only_with_segmentor_checkpoint_imports_it(trained, tmp_path):
    """`--only cft-seg --segmentor-checkpoint FILE` (it ignored FILE: the stage filter ran first):
    FILE becomes the run's segmentor and the fine-tuning uses it."""
    run_dir = _copy(trained, tmp_path / "run")
    ck = run_dir / "checkpoints"
    other = shutil.copy(ck / "eval_segmentor.pt", tmp_path / "other.pt")
    run_training(smoke(), run_dir, only=["cft-seg"], segmentor_checkpoint=other)
    imported = load_checkpoint(ck / "segmentor.pt")
    assert imported["source"] == str(other)
    expected = load_checkpoint(other)["model"]
    assert all(torch.equal(imported["model"][k], expected[k]) for k in expected)
    before, after = load_checkpoint(trained / "checkpoints" / "cft-seg.pt"), load_checkpoint(ck / "cft-seg.pt")
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_segmentor_checkpoint_of_another_model_fails_before_training(trained, tmp_path):
    """`--segmentor-checkpoint` given a generator checkpoint: one line naming the file, raised
    before the first stage trains."""
    from segcft.errors import UserError

    with pytest.raises(UserError, match=r"generator\.pt does not fit the segmentor 'unet'") as e:
        run_training(smoke(), tmp_path / "fresh", segmentor_checkpoint=trained / "checkpoints" / "generator.pt")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "fresh" / "checkpoints").exists()
