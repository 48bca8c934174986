"""Stages side by side on the CPU (segcft.train.lanes): the plan, that a lane trains a stage to
the same weights and metrics rows as the stage trained alone, and that a lane's error reaches
the caller as the error it was."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segcft import plugins
from segcft.checkpoint import load_checkpoint
from segcft.config import load_run_config
from segcft.train import run_training, stage_names
from segcft.train.gate import SegmentorNotLearned
from segcft.train.lanes import lanes_possible, plan_waves


def _cfg(*overrides: str, preset: str = "smoke"):
    return load_run_config(None, preset, list(overrides))


def test_plan_puts_independent_stages_side_by_side_and_the_rest_alone():
    cfg = _cfg("cft.modes=[none,reg,seg]", preset="quick")
    stages = stage_names(cfg)
    waves = plan_waves(cfg, stages, threads=2, lanes=2)
    assert [sorted(s for lane in w for s in lane.stages) for w in waves] == [
        ["eval_segmentor", "mechanisms", "regressor", "segmentor"],
        ["generator"],
        ["cft-reg", "cft-seg"],
        ["evaluate"],
    ]
    assert [[lane.threads for lane in w] for w in waves] == [[1, 1], [2], [1, 1], [2]]
    # the two segmentors (the longest stages) go to different lanes; each lane keeps table order
    first = waves[0]
    assert not any({"segmentor", "eval_segmentor"} <= set(lane.stages) for lane in first)
    for lane in first:
        assert list(lane.stages) == [s for s in stages if s in lane.stages]
    # one thread or one lane: everything one after another with all threads
    for threads, lanes in ((1, 2), (2, 1)):
        plan = plan_waves(cfg, stages, threads=threads, lanes=lanes)
        assert all(len(w) == 1 and w[0].threads == threads for w in plan)
        assert [s for w in plan for s in w[0].stages] == stages
    # four threads, three fine-tuning modes, two lanes: 2 threads each
    cfg3 = _cfg("cft.modes=[none,reg,seg,pos-seg]", "dataset.name=ccta-phantom", preset="quick")
    plan = plan_waves(cfg3, stage_names(cfg3), threads=4, lanes=2)
    cft = next(w for w in plan if any(s.startswith("cft-") for lane in w for s in lane.stages))
    assert [lane.threads for lane in cft] == [2, 2] and sum(len(lane.stages) for lane in cft) == 3
    # 3D quick: the wide evaluation segmentor's lane is the long one, and the generator trains in the
    # other (one thread) instead of alone after the wave; with the guide's width the lanes are even
    # and it trains alone with both threads, as in 2D above
    cfg3d = _cfg("dataset.name=ccta-phantom", preset="quick")
    first = plan_waves(cfg3d, stage_names(cfg3d), threads=2, lanes=2)[0]
    assert [lane.threads for lane in first] == [1, 1]
    assert not any({"eval_segmentor", "generator"} <= set(lane.stages) for lane in first)
    assert "generator" in {s for lane in first for s in lane.stages}
    even = _cfg("dataset.name=ccta-phantom", "eval_segmentor.channels=[8,16,32,64]", "train.segmentor.eval_steps=0",
                preset="quick")  # fmt: skip
    assert [[s for lane in w for s in lane.stages] for w in plan_waves(even, stage_names(even), 2, 2)][1] == [
        "generator"
    ]


def test_lanes_need_one_cpu_process_and_no_inline_plugins(monkeypatch):
    ctx = SimpleNamespace(device=torch.device("cpu"), d=SimpleNamespace(enabled=False))
    assert lanes_possible(ctx)  # type: ignore[arg-type]
    assert not lanes_possible(SimpleNamespace(device=torch.device("cpu"), d=SimpleNamespace(enabled=True)))  # type: ignore[arg-type]
    monkeypatch.setitem(plugins._STATE, "extra", [("inline", object())])
    assert not lanes_possible(ctx)  # type: ignore[arg-type]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    if torch.get_num_threads() < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    yield
    torch.set_num_threads(before)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return sorted((dict(r) for r in csv.DictReader(f)), key=lambda r: (r["stage"], float(r["step"])))


@pytest.mark.timeout(240)
def test_a_lane_trains_each_stage_as_it_trains_alone(tmp_path, capsys, two_threads):
    """A whole run with lanes against the same config run one stage per call (``only``), each
    stage then training alone in this process with its planned threads: every checkpoint is the
    same bit for bit and metrics.csv holds the same rows (timings aside)."""
    cfg = _cfg("cpu_lanes=2", "cft.modes=[none,reg,seg]", "evaluate.n=2", "evaluate.bootstrap=2")
    run_training(cfg, tmp_path / "lanes")
    out = capsys.readouterr().out
    assert out.count("[lanes] side by side, 1 thread(s) each") == 2, out
    for stage in stage_names(cfg):
        run_training(cfg, tmp_path / "alone", only=[stage])
    assert "[lanes]" not in capsys.readouterr().out
    for stage in stage_names(cfg)[:-1]:
        a = load_checkpoint(tmp_path / "lanes" / "checkpoints" / f"{stage}.pt")["model"]
        b = load_checkpoint(tmp_path / "alone" / "checkpoints" / f"{stage}.pt")["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    timing = {"samples_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "lanes")) == strip(_rows(tmp_path / "alone"))
    gates = json.loads((tmp_path / "lanes" / "gates.json").read_text())
    assert set(gates) == {"segmentor", "eval_segmentor"}  # both lanes' records kept


@pytest.mark.timeout(120)
def test_an_error_in_a_lane_is_raised_as_it_was(tmp_path, two_threads):
    cfg = _cfg("cpu_lanes=2", "train.segmentor.gate_dice=0.99", "train.segmentor.gate=stop")
    with pytest.raises(SegmentorNotLearned, match="has not learned"):
        run_training(cfg, tmp_path, only=["segmentor", "eval_segmentor"])
    assert not (tmp_path / "checkpoints" / "segmentor.pt").exists()
