"""The run's time estimate (segcft.train.progress.RunClock), the CPU thread count chosen from
the machine and the malloc setting of CPU runs (segcft.train.context)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from segcft.config import SegmentorStageConfig
from segcft.train import context, progress
from segcft.train.progress import SAMPLE_COST, SAMPLE_COST_3D, RunClock, stage_units


def _cfg() -> SimpleNamespace:
    step = lambda steps, batch: SimpleNamespace(steps=steps, batch_size=batch)  # noqa: E731
    train = SimpleNamespace(
        mechanisms=step(1000, 256),
        segmentor=SegmentorStageConfig(steps=100, batch_size=16),
        regressor=step(50, 16),
        generator=step(200, 16),
    )
    return SimpleNamespace(
        train=train, cft=SimpleNamespace(steps=40, batch_size=16, modes=["none", "seg"]), evaluate=SimpleNamespace(n=8)
    )


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_estimate_scales_later_stages_by_their_sample_cost(monkeypatch, capsys):
    clock_time = FakeTime()
    monkeypatch.setattr(progress.time, "perf_counter", clock_time)
    cfg = _cfg()
    stages = ["mechanisms", "segmentor", "generator", "cft-seg", "evaluate"]
    clock = RunClock(cfg, stages, enabled=True, eps_samples=64)
    clock_time.now = 10.0  # mechanisms took 10 s; it never calibrates
    for step in range(1, 11):
        clock.observe("mechanisms", step, 0, 1000, 0.0)
    assert clock.estimate is None
    per_step = 0.5  # the segmentor: 0.5 s a step, its first steps slower (skipped)
    for step in range(1, 101):
        clock_time.now += 3.0 if step <= progress.ESTIMATE_WARMUP else per_step
        clock.observe("segmentor", step, 0, 100, 10.0)
        if clock.estimate is not None:
            break
    assert step == progress.ESTIMATE_WARMUP + progress.ESTIMATE_STEPS
    unit_s = per_step / (SAMPLE_COST["segmentor"] * 16)
    expected = clock_time.now + per_step * (100 - step)
    expected += unit_s * (SAMPLE_COST["generator"] * 200 * 16 + progress.EPS_COST * 64)
    expected += unit_s * SAMPLE_COST["cft"] * 40 * 16 + unit_s * progress.EVAL_COST[2] * 8 * 2
    assert clock.estimate == pytest.approx(expected)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [line for line in lines if line.startswith(f"estimated total time: ~{round(expected / 60)} min")]
    assert len(lines) == 1
    clock.observe("generator", 30, 0, 200, clock_time.now)  # printed once
    assert capsys.readouterr().out == ""


def test_estimate_of_stages_side_by_side_takes_the_longest_lane(monkeypatch, capsys):
    """Lanes with 1 of 2 threads: the timed segmentor's rate is scaled to 2 threads for the
    generator; the regressor beside it costs what is left of its lane."""
    from segcft.train.lanes import Lane

    clock_time = FakeTime()
    monkeypatch.setattr(progress.time, "perf_counter", clock_time)
    cfg = _cfg()
    waves = [[Lane(1, ("segmentor",)), Lane(1, ("regressor",))], [Lane(2, ("generator",))]]
    clock = RunClock(cfg, ["segmentor", "regressor", "generator"], enabled=True, eps_samples=0, waves=waves)
    clock.start_wave()
    per_step = 0.5
    for step in range(1, 101):
        clock_time.now += per_step
        clock.observe("segmentor", step, 0, 100, 0.0)
        if clock.estimate is not None:
            break
    slow, slow_reg = progress.LANE_SLOWDOWN["segmentor"], progress.LANE_SLOWDOWN["regressor"]
    unit_s = per_step / (SAMPLE_COST["segmentor"] * 16) / slow  # at both threads
    segmentor_left = per_step * (100 - step)
    regressor_left = unit_s * slow_reg * SAMPLE_COST["regressor"] * 50 * 16 - clock_time.now
    generator = unit_s * SAMPLE_COST["generator"] * 200 * 16
    expected = clock_time.now + max(segmentor_left, regressor_left) + generator
    assert clock.estimate == pytest.approx(expected)
    # timed in another process: the step's own time counts, not the moment it is read
    clock_time.now = 0.0
    clock2 = RunClock(cfg, ["segmentor", "generator"], enabled=False, eps_samples=0)
    for step in range(1, 101):
        clock2.observe("segmentor", step, 0, 100, 0.0, now=step * per_step)
    assert clock2.estimate == pytest.approx(100 * per_step + unit_s * slow * SAMPLE_COST["generator"] * 200 * 16)
    assert progress.lane_slowdown("cft-seg", 1, 4) == pytest.approx(progress.LANE_SLOWDOWN["cft"] ** 2)


def test_estimate_times_each_stage_apart_when_lanes_interleave(capsys):
    """Two lanes relay their first steps to one clock: the segmentor starting 6 s into the
    evaluation segmentor's timing (after the parent mechanisms) must not restart that timing."""
    from segcft.train.lanes import Lane

    cfg = _cfg()
    stages = ["mechanisms", "segmentor", "eval_segmentor", "generator"]
    waves = [[Lane(1, ("mechanisms", "segmentor")), Lane(1, ("eval_segmentor",))], [Lane(2, ("generator",))]]
    clock = RunClock(cfg, stages, enabled=True, eps_samples=0, waves=waves)
    per_step = 0.5
    events = [(k * per_step, "eval_segmentor", k) for k in range(1, 101)]
    events += [(6.0 + k * per_step, "segmentor", k) for k in range(1, 101)]
    for now, stage, step in sorted(events):
        clock.observe(stage, step, 0, 100, 0.0 if stage == "eval_segmentor" else 6.0, now=now)
        if clock.estimate is not None:
            break
    assert (stage, step) == ("eval_segmentor", progress.ESTIMATE_WARMUP + progress.ESTIMATE_STEPS)
    assert f"from eval_segmentor at {per_step:.3f} s/step" in capsys.readouterr().out


def test_estimate_of_a_stage_shorter_than_the_timed_steps(capsys):
    clock = RunClock(_cfg(), ["generator"], enabled=True, eps_samples=0)
    for step in range(1, 5):
        clock.observe("generator", step, 0, 4, 0.0)
    assert clock.estimate is not None and capsys.readouterr().out.startswith("estimated total time: ~1 min")


def test_stage_units_follow_steps_and_batch():
    cfg = _cfg()
    assert stage_units(cfg, "regressor", 0) == (SAMPLE_COST["regressor"] * 50 * 16, 0.0)
    assert stage_units(cfg, "generator", 10)[0] == pytest.approx(200 * 16 + progress.EPS_COST * 10)
    assert stage_units(cfg, "mechanisms", 0) == (0.0, 1000 * progress.MECHANISMS_STEP_S)
    assert stage_units(cfg, "eval_segmentor", 0) == stage_units(cfg, "segmentor", 0)  # trained like the guide


def test_evaluation_counts_the_pretrained_generator_once():
    """`--cft pos-seg` evaluates none and pos-seg: two modes, as many as modes [none, pos-seg]."""
    cfg = _cfg()
    cfg.cft.modes = ["pos-seg"]
    one = stage_units(cfg, "evaluate", 0)
    cfg.cft.modes = ["none", "pos-seg"]
    assert one == stage_units(cfg, "evaluate", 0) == (progress.EVAL_COST[2] * cfg.evaluate.n * 2, 0.0)


def test_an_evaluation_of_the_whole_split_is_estimated_from_its_size(monkeypatch):
    """evaluate.n null (the paper preset) reads the whole split: the estimate takes the split's
    size from the run, and without it leaves the evaluation out instead of failing."""
    cfg = _cfg()
    cfg.evaluate.n = None
    assert stage_units(cfg, "evaluate", 0) == (0.0, 0.0)
    assert stage_units(cfg, "evaluate", 0, eval_n=30) == (progress.EVAL_COST[2] * 30 * 2, 0.0)
    monkeypatch.setattr(progress.time, "perf_counter", FakeTime())
    totals = {}
    for n in (None, 30):
        clock = RunClock(cfg, ["segmentor", "evaluate"], enabled=False, eps_samples=0, eval_n=n)
        for step in range(1, 101):
            clock.observe("segmentor", step, 0, 100, 0.0, now=step * 0.5)
        assert clock.estimate is not None
        totals[n] = clock.estimate
    assert totals[30] > totals[None] == pytest.approx(100 * 0.5)


def test_volumes_use_their_own_sample_costs(monkeypatch):
    """A 3D run's estimate converts the segmentor's rate with the 3D costs: the generator stage of
    the same config is estimated SAMPLE_COST_3D / SAMPLE_COST times shorter from the same timing."""
    cfg = _cfg()
    assert stage_units(cfg, "segmentor", 0, dims=3) == (SAMPLE_COST_3D["segmentor"] * 100 * 16, 0.0)
    assert stage_units(cfg, "evaluate", 0, dims=3)[0] == progress.EVAL_COST[3] * 8 * 2
    monkeypatch.setattr(progress.time, "perf_counter", FakeTime())
    estimates = {}
    for dims in (2, 3):
        clock = RunClock(cfg, ["segmentor", "generator"], enabled=False, eps_samples=0, dims=dims)
        for step in range(1, 101):
            clock.observe("segmentor", step, 0, 100, 0.0, now=step * 0.5)
        assert clock.estimate is not None
        estimates[dims] = clock.estimate - 100 * 0.5  # the generator's part
    ratio = SAMPLE_COST["segmentor"] / SAMPLE_COST_3D["segmentor"]
    assert estimates[3] == pytest.approx(estimates[2] * ratio)


def test_available_cpus_honours_a_cgroup_quota(monkeypatch, tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    monkeypatch.setattr(context, "CGROUP_QUOTAS", ((v2, None),))
    monkeypatch.setattr(context.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert context.available_cpus() == 2
    v2.write_text("max 100000\n")
    assert context.available_cpus() == 64


def test_set_cpu_threads_caps_torch_threads_unless_omp_chose(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(context, "available_cpus", lambda: 1)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(2)
        assert context.set_cpu_threads() == 2  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert context.set_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)


class CountingDataset(torch.utils.data.Dataset):
    """Deterministic items; counts how often each index is read."""

    deterministic = True

    def __init__(self, n: int = 10) -> None:
        self.n, self.reads, self.info = n, [0] * n, "info"

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        for i in indices:
            self.reads[i] += 1
        return [{"image": torch.full((4,), float(i)), "index": torch.tensor(i)} for i in indices]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]


def test_cached_samples_read_each_index_once_within_the_budget():
    ds = CountingDataset()
    cached = context.CachedSamples(ds, budget=5 * (16 + 8))  # room for five items
    loader = torch.utils.data.DataLoader(cached, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for batch in loader:
            assert torch.equal(batch["image"][:, 0], batch["index"].float())
    assert len(cached.cache) == 5 and cached.used <= cached.budget
    assert sorted(ds.reads[i] for i in cached.cache) == [1] * 5  # cached once read
    assert all(ds.reads[i] == 3 for i in range(10) if i not in cached.cache)  # the rest read every epoch
    assert torch.equal(cached[-1]["image"], ds[9]["image"]) and len(cached) == 10
    assert cached.info == "info"  # everything else is the dataset's


def test_cacheable_datasets():
    from segcft.components import build_dataset
    from segcft.config import load_run_config

    assert context.cacheable(build_dataset(load_run_config(None, "smoke", []), "train"))
    assert context.cacheable(CountingDataset())
    assert not context.cacheable(torch.utils.data.TensorDataset(torch.zeros(3)))  # may draw at random


_CHURN = """
import resource, sys, torch
from segcft.train.context import keep_freed_memory, release_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def churn():  # 48 MiB tensors: above glibc's 32 MiB ceiling for keeping freed blocks by default
    for _ in range(6):
        t = torch.empty(48 << 20, dtype=torch.uint8)
        t.fill_(1)
        del t
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
kept = resident()
release_freed_memory()  # the freed 48 MiB go back to the kernel
print(applied, faults, kept - resident())
"""


def _churn(mode: str, env: dict[str, str] | None = None) -> tuple[str, int, int]:
    """(applied, page faults of a round of reallocations, resident bytes that release_freed_memory gave back)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    applied, faults, released = out.stdout.split()
    return applied, int(faults), int(released)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in context.MALLOC_VARIABLES}
    applied, faults, released = _churn("keep", clean)
    pages = (48 << 20) // resource.getpagesize()  # one tensor's
    assert applied == "True"
    assert faults < 0.01 * pages, f"{faults} page faults re-allocating 6 x {pages} pages of freed memory"
    assert released > 24 << 20, f"release_freed_memory gave back {released} of the 48 MiB freed"
    for choice in ({"MALLOC_ARENA_MAX": "2"}, {"THP_MEM_ALLOC_ENABLE": "1"}):  # the user chose: left alone
        applied, _, _ = _churn("keep", {**clean, **choice})
        assert applied == "False", choice
