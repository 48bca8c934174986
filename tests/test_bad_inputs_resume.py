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
from segcft.train import _Pipeline, run_training

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]

# Every fitted stage takes 4 steps and leaves a resume checkpoint after each one; a kill at the
# second checkpoint (after step 2) leaves the one of step 1, so a resume redoes step 2.
OVERRIDES = [
    "device=cpu", "cft.modes=[none,reg,seg]", "cft.steps=4",
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
    save_last, save_final = _Pipeline._save_last, _Pipeline._save_final
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

    _Pipeline._save_last, _Pipeline._save_final = last, final
    try:
        yield
    finally:
        _Pipeline._save_last, _Pipeline._save_final = save_last, save_final


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
        if key == "model":
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
    from segcft.train import _MetricsLog

    path = tmp_path / "metrics.csv"
    path.write_text("stage,step,loss\r\ngenerator,2,5.25\r\ngenerator,4,5.1")
    log = _MetricsLog(path, True)
    assert capsys.readouterr().err.count("torn row") == 1
    log.log("generator", 4, {"loss": 5.0})  # appended
    log.close()
    log = _MetricsLog(path, True)
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
