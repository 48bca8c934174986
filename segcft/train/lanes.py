"""Stages side by side on the CPU. A 2-core machine trains two small-batch stages at once
about 1.2-1.3 times faster than one after the other with both threads each (benchmarks/RESULTS.md,
"Stages side by side"): the segmentors, regressor and mechanisms need nothing from each other,
nor do the fine-tuning modes. The stage table is cut into *waves* of such neighbouring stages
(the generator joins the wave before it when one lane there is much longer than the others);
a wave's stages are shared out between up to ``cpu_lanes`` *lanes*, each a spawned process with
its share of the threads that trains its stages one after another. The plan depends on the run's
config and thread count only, never on timing or on which stages are already done, so every stage
trains with the same number of threads (and so the same floating-point sums) whether the run goes
straight through, is resumed, or redoes the stage alone with ``--only``. The lanes send their
metrics rows and step times to the main process, which alone writes metrics.csv."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcft.config import is_3d_dataset
from segcft.distributed import Dist
from segcft.errors import UserError
from segcft.run import RunDir
from segcft.train.context import StageContext, keep_freed_memory
from segcft.train.progress import ESTIMATE_STEPS, ESTIMATE_WARMUP, lane_slowdown, stage_units
from segcft.train.stages import EPS_SAMPLES, run_stage, stage_entry

__all__ = ["Lane", "plan_waves", "run_lanes"]

NOMINAL_UNIT_S = 0.02
"""Seconds of one generator-sample unit (:func:`stage_units`) used to weigh stages against the
mechanisms' fixed seconds when sharing a wave out (a 64 x 64 sample on 2 cores)."""

POLL_S = 0.5
"""Seconds between checks that the lane processes are still alive while none reports."""


@dataclass(frozen=True)
class Lane:
    """Stages trained one after another in one process with ``threads`` intra-op threads."""

    threads: int
    stages: tuple[str, ...]


def plan_waves(cfg: Any, stages: list[str], threads: int, lanes: int) -> list[list[Lane]]:
    """The run's ``stages`` (all of them, in table order) as waves of lanes. Neighbouring
    side-by-side stages that do not read each other form one wave, shared out between
    ``min(lanes, threads, len(wave))`` lanes of ``threads // that`` threads each, longest stage
    first onto the least loaded lane; a stage that may join a wave (the generator) joins the one
    before it when the stages' nominal costs say that the wave then ends sooner than the wave and
    the stage one after the other; every other stage is a wave of one lane with all threads."""
    waves: list[list[Lane]] = []
    group: list[str] = []

    def close() -> None:
        if group:
            waves.append(_share_out(cfg, list(group), threads, lanes))
            group.clear()

    for stage in stages:
        entry = stage_entry(cfg, stage)
        independent = not set(entry.requires(cfg, stage)) & set(group)
        if entry.side_by_side and independent:
            group.append(stage)
            continue
        if entry.joins_wave and group and independent and _joining_is_sooner(cfg, group, stage, threads, lanes):
            group.append(stage)
            continue
        close()
        if entry.side_by_side:
            group.append(stage)
        else:
            waves.append([Lane(threads, (stage,))])
    close()
    return waves


def _joining_is_sooner(cfg: Any, group: list[str], stage: str, threads: int, lanes: int) -> bool:
    """Whether ``stage`` in a lane of the wave of ``group`` ends sooner (nominally) than the wave
    followed by ``stage`` alone with all ``threads``."""
    apart = _wave_seconds(cfg, _share_out(cfg, group, threads, lanes), threads) + _nominal_seconds(cfg, stage)
    return _wave_seconds(cfg, _share_out(cfg, [*group, stage], threads, lanes), threads) < apart


def _wave_seconds(cfg: Any, wave: list[Lane], threads: int) -> float:
    """Nominal seconds of a wave: its longest lane, each stage slowed to its lane's threads."""
    return max(
        sum(_nominal_seconds(cfg, s) * lane_slowdown(s, lane.threads, threads) for s in lane.stages) for lane in wave
    )


def _share_out(cfg: Any, group: list[str], threads: int, lanes: int) -> list[Lane]:
    n = min(lanes, threads, len(group))
    if n <= 1:
        return [Lane(threads, tuple(group))]
    cost = {s: _nominal_seconds(cfg, s) * lane_slowdown(s, threads // n, threads) for s in group}
    loads = [0.0] * n
    members: list[list[str]] = [[] for _ in range(n)]
    for stage in sorted(group, key=lambda s: (-cost[s], group.index(s))):
        i = loads.index(min(loads))
        loads[i] += cost[stage]
        members[i].append(stage)
    return [Lane(threads // n, tuple(sorted(m, key=group.index))) for m in members]


def _nominal_seconds(cfg: Any, stage: str) -> float:
    dims = 3 if cfg.dataset.name and is_3d_dataset(cfg.dataset.name, cfg.dataset.params) else 2
    units, fixed = stage_units(cfg, stage, EPS_SAMPLES, dims)
    return units * NOMINAL_UNIT_S + fixed


def lanes_possible(ctx: StageContext) -> bool:
    """Whether this run may train stages side by side: one CPU process (no torchrun ranks) on a
    POSIX system, with every plugin importable in a fresh process (none registered inline)."""
    from segcft import plugins

    return ctx.device.type == "cpu" and not ctx.d.enabled and os.name == "posix" and not plugins.has_inline_plugins()


# -- the main process --------------------------------------------------------------------------
def run_lanes(ctx: StageContext, lanes: list[Lane]) -> None:
    """Train ``lanes`` (each a list of stages not done yet) in spawned processes at once, relaying
    their metrics rows to ``ctx.metrics`` and their steps to ``ctx.clock``. The first failure
    stops the other lanes and is raised here (a UserError as it was raised, anything else with
    the lane's traceback); an interrupt stops them all (their resume checkpoints stay)."""
    mp = multiprocessing.get_context("spawn")
    channel = mp.Queue()
    jobs = [
        _LaneJob(
            i,
            lane.threads,
            lane.stages,
            ctx.cfg,
            str(ctx.run.root),
            ctx.resume,
            ctx.segmentor_checkpoint,
            ctx.segmentor_import,
        )
        for i, lane in enumerate(lanes)
    ]
    if ctx.d.main:
        shown = " | ".join(" + ".join(lane.stages) for lane in lanes)
        print(f"[lanes] side by side, {lanes[0].threads} thread(s) each: {shown}", flush=True)
    procs = [mp.Process(target=_lane_main, args=(job, channel), daemon=True) for job in jobs]
    finished: set[int] = set()
    try:
        for p in procs:
            p.start()
        while len(finished) < len(procs):
            try:
                message = channel.get(timeout=POLL_S)
            except queue_module.Empty:
                for i, p in enumerate(procs):
                    if i not in finished and p.exitcode is not None:
                        raise RuntimeError(
                            f"the lane training {' + '.join(lanes[i].stages)} ended without a word "
                            f"(exit code {p.exitcode}); its stages can be resumed with --resume auto"
                        ) from None
                continue
            _handle(ctx, message, finished, lanes)
    finally:
        for p in procs:
            if p.is_alive() and len(finished) < len(procs):
                p.terminate()
        for p in procs:
            p.join()
        channel.close()


def _handle(ctx: StageContext, message: tuple[Any, ...], finished: set[int], lanes: list[Lane]) -> None:
    kind = message[0]
    if kind == "log":
        ctx.metrics.log(*message[1:])
    elif kind == "drop":
        ctx.metrics.drop_stage(*message[1:])
    elif kind == "step":
        if ctx.clock is not None:
            ctx.clock.observe(*message[1:])
    elif kind == "done":
        finished.add(message[1])
    elif kind == "error":
        _, index, payload, trace = message
        error = _unpickle(payload)
        if isinstance(error, UserError | KeyboardInterrupt):
            raise error
        raise RuntimeError(f"the lane training {' + '.join(lanes[index].stages)} failed:\n{trace}")


def _unpickle(payload: bytes | None) -> BaseException | None:
    if payload is None:
        return None
    try:
        error = pickle.loads(payload)
    except Exception:
        return None
    return error if isinstance(error, BaseException) else None


# -- a lane process ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _LaneJob:
    index: int
    threads: int
    stages: tuple[str, ...]
    cfg: Any
    run_root: str
    resume: bool
    segmentor_checkpoint: Path | None
    segmentor_import: dict[str, torch.Tensor] | None


class _RelayLog:
    """The MetricsLog of a lane: rows and drops go to the main process."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        self.channel.put(("log", stage, step, dict(values)))

    def drop_stage(self, stage: str, from_step: int = 0) -> None:
        self.channel.put(("drop", stage, from_step))

    def close(self) -> None:
        pass


class _RelayClock:
    """The RunClock of a lane: the steps that the main process's clock times (each stage's
    first ``ESTIMATE_WARMUP + ESTIMATE_STEPS``) go to it, the rest of the training step stays
    free of messages. A lane whose main process is gone (killed) stops instead of training on
    for nobody."""

    def __init__(self, channel: Any, parent: int) -> None:
        self.channel, self.parent = channel, parent

    def observe(self, stage: str, step: int, start: int, total: int, stage_t0: float) -> None:
        if os.getppid() != self.parent:
            os._exit(3)
        if step <= start + ESTIMATE_WARMUP + ESTIMATE_STEPS:
            self.channel.put(("step", stage, step, start, total, stage_t0, time.perf_counter()))


def _lane_main(job: _LaneJob, channel: Any) -> None:
    """Entry point of a lane process: train its stages that are not done, one after another."""
    parent = os.getppid()
    try:
        torch.set_num_threads(job.threads)
        keep_freed_memory()
        ctx = StageContext(
            job.cfg, RunDir(job.run_root), Dist(), torch.device("cpu"), job.resume, metrics=_RelayLog(channel)
        )
        ctx.bars = False  # several lanes print to one terminal: plain progress lines
        ctx.segmentor_checkpoint, ctx.segmentor_import = job.segmentor_checkpoint, job.segmentor_import
        ctx.clock = _RelayClock(channel, parent)  # type: ignore[assignment]  # the same observe()
        for stage in job.stages:
            if not ctx.run.done(stage):
                run_stage(ctx, stage)
        channel.put(("done", job.index))
    except BaseException as error:  # every failure, interrupts included, is reported to the main process
        try:
            payload: bytes | None = pickle.dumps(error)
        except Exception:
            payload = None
        channel.put(("error", job.index, payload, traceback.format_exc()))
    finally:
        channel.close()
        channel.join_thread()
