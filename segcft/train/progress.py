"""Progress of a running stage: a tqdm bar on a terminal, plain log lines otherwise; and the
run's time estimate, printed once the first image stage has timed a few steps."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

__all__ = ["Progress", "RunClock", "lane_slowdown", "sample_cost", "stage_units"]

SAMPLE_COST = {"segmentor": 0.19, "eval_segmentor": 0.19, "regressor": 0.26, "generator": 1.0, "cft": 1.76}
"""Cost of one training sample of each stage relative to one generator sample, data reading
and the segmentors' quality gate included (the quick preset's stage times in 2D, trained one
after another with 2 threads, benchmarks/RESULTS.md, "Stages side by side"; the segmentors' and
the regressor's raised by 1/0.89 since the one-pass GELU made the HVAE's passes, in the
generator, fine-tuning and evaluation alike, 11 % cheaper). Volumes use SAMPLE_COST_3D."""

SAMPLE_COST_3D = {"segmentor": 0.39, "eval_segmentor": 0.39, "regressor": 0.47, "generator": 1.0, "cft": 1.85}
"""The same for volumes (64 x 32 x 32, batches of 4), from three quick 3D runs under emulated AVX2
(benchmarks/RESULTS.md, "End to end", 2026-12-06: the segmentors' first timed steps against each
later stage's time). A 3D segmentor sample costs more next to a generator sample than in 2D, and
its first steps, which the estimate is calibrated on, render the phantom (the training split is
cached after the first epoch): at 0.31 the 3D runs were estimated at 26 minutes for 19.5-20."""

EPS_COST = 0.3
"""Cost of one sample of the generator stage's eps pass (forward only) in generator samples."""

EVAL_COST = {2: 12.0, 3: 12.0}
"""Cost of evaluating one test sample in one mode in generator samples, per number of spatial
dimensions (3D: 15 until composition's ten cycles ran on every subject; evaluate.composition_n)."""

MECHANISMS_STEP_S = 0.005
"""Seconds per step of the parent mechanisms (a small MLP; independent of the image size)."""

ESTIMATE_WARMUP, ESTIMATE_STEPS = 5, 20
"""Steps of the calibrating stage skipped (first-step allocations), then timed."""


def _kind(stage: str) -> str:
    return "cft" if stage.startswith("cft-") else "segmentor" if stage.startswith("segmentor-") else stage


def _schedule(cfg: Any, stage: str) -> Any:
    """The config section with ``steps`` and ``batch_size`` of a training stage (None for a
    stage without one)."""
    if stage.startswith("cft-"):
        return cfg.cft
    if "segmentor" in stage:
        return cfg.train.segmentor.for_stage(stage)
    return getattr(cfg.train, stage, None)


WIDTH_COST_EXPONENT = 0.585
"""A segmentor sample's cost grows as (its channels / the guide's) to this power: twice the channels
(unet 16-32-64-128 against 8-16-32-64) took 1.5 x the time per step at 64 x 32 x 32 on one thread."""


def sample_cost(stage: str, dims: int = 2, cfg: Any = None) -> float:
    """Cost of one training sample of ``stage`` in generator samples, for 2D images or 3D volumes;
    with the run ``cfg``, an evaluation segmentor wider than the guide (``eval_segmentor.channels``)
    costs more."""
    cost = (SAMPLE_COST_3D if dims == 3 else SAMPLE_COST).get(_kind(stage), 1.0)
    overrides = getattr(cfg, "eval_segmentor", None) if stage == "eval_segmentor" else None
    wide = overrides.get("channels") if overrides else None
    base = getattr(cfg.segmentor.params, "channels", None) if wide else None
    if wide and base:
        cost *= (sum(wide) / sum(base)) ** WIDTH_COST_EXPONENT
    return cost


def stage_units(
    cfg: Any, stage: str, eps_samples: int, dims: int = 2, eval_n: int | None = None
) -> tuple[float, float]:
    """(generator-sample units, fixed seconds) of ``stage`` under the run config for data of
    ``dims`` spatial dimensions; the generator stage includes its eps pass over ``eps_samples``
    samples. The evaluation reads ``evaluate.n`` samples, or ``eval_n`` (the split's size) where
    that is null (the whole split); nothing when neither is known."""
    if stage == "mechanisms":
        return 0.0, cfg.train.mechanisms.steps * MECHANISMS_STEP_S
    if stage == "evaluate":
        # the evaluation scores the pre-trained generator ("none") whether or not modes lists it
        modes = 1 + len([m for m in cfg.cft.modes if m != "none"])
        n = cfg.evaluate.n if cfg.evaluate.n is not None else eval_n
        return (EVAL_COST[3 if dims == 3 else 2] * n * modes if n is not None else 0.0), 0.0
    sc = _schedule(cfg, stage)
    if sc is None:
        return 0.0, 0.0
    units = sample_cost(stage, dims, cfg) * sc.steps * sc.batch_size
    return units + (EPS_COST * eps_samples if stage == "generator" else 0.0), 0.0


LANE_SLOWDOWN = {"segmentor": 1.3, "eval_segmentor": 1.3, "regressor": 1.3, "cft": 1.4}
"""How much longer a stage takes with half the threads in a lane beside another than alone with
all of them (2 cores: segmentors 1.2-1.4 x, regressor 1.3 x, fine-tuning 1.4 x;
benchmarks/RESULTS.md, "Stages side by side"); t of T threads cost (T / t) ** log2(this)."""


def lane_slowdown(stage: str, threads: int, of: int) -> float:
    """Time factor of ``stage`` trained with ``threads`` of the run's ``of`` threads."""
    if threads >= of:
        return 1.0
    return (of / max(threads, 1)) ** math.log2(LANE_SLOWDOWN.get(_kind(stage), 1.5))


class RunClock:
    """Estimates the wall time of this invocation from the step rate of the first image stage
    that trains: each later stage costs its units (:func:`stage_units`) at the seconds per unit
    that stage showed, scaled to its lane's threads; stages that train side by side
    (``waves``, segcft/train/lanes.py) cost the longest of their lanes. Prints
    ``estimated total time: ~M min`` once (rank 0)."""

    def __init__(
        self,
        cfg: Any,
        stages: list[str],
        enabled: bool,
        eps_samples: int,
        waves: list[list[Any]] | None = None,
        dims: int = 2,
        eval_n: int | None = None,
    ) -> None:
        self.cfg, self.stages, self.enabled, self.eps_samples = cfg, list(stages), enabled, eps_samples
        self.dims, self.eval_n = dims, eval_n
        # lanes as (threads, stages to run), empty ones left out; without a plan, one after another
        self.waves: list[list[tuple[int, list[str]]]] = []
        plan = [[(lane.threads, lane.stages) for lane in wave] for wave in waves or []]
        for wave in plan or [[(1, (s,))] for s in self.stages]:
            lanes = [(threads, [s for s in stages if s in self.stages]) for threads, stages in wave]
            if any(run for _, run in lanes):
                self.waves.append([lane for lane in lanes if lane[1]])
        self.threads = max((lane[0] for wave in self.waves for lane in wave), default=1)
        self.t0 = time.perf_counter()
        self.wave_t0 = self.t0
        self.estimate: float | None = None
        # per stage: (step, time) its timing starts from; lanes interleave their stages' steps
        self._marks: dict[str, tuple[int, float]] = {}

    def start_wave(self) -> None:
        """Called when the next wave of stages starts."""
        self.wave_t0 = time.perf_counter()

    def observe(self, stage: str, step: int, start: int, total: int, stage_t0: float, now: float | None = None) -> None:
        """Called after every training step of ``stage`` (steps ``start``..``total``; the
        stage's loop started at ``stage_t0``; ``now`` is the step's perf_counter time when it
        was taken in another process)."""
        if self.estimate is not None or stage == "mechanisms" or stage not in self.stages:
            return
        if _schedule(self.cfg, stage) is None:
            return
        now = time.perf_counter() if now is None else now
        warm = min(ESTIMATE_WARMUP, (total - start) // 2)
        mark = self._marks.get(stage)
        if mark is None or mark[0] < start:
            mark = self._marks[stage] = (start, stage_t0)
        if step == start + warm:
            mark = self._marks[stage] = (step, now)
        if step >= min(start + warm + ESTIMATE_STEPS, total) and step > mark[0]:
            per_step = (now - mark[1]) / (step - mark[0])
            self._report(stage, per_step, total - step, now)

    def _slowdown(self, stage: str, threads: int) -> float:
        return lane_slowdown(stage, threads, self.threads)

    def _report(self, stage: str, per_step: float, steps_left: int, now: float) -> None:
        sc = _schedule(self.cfg, stage)
        w = next(i for i, wave in enumerate(self.waves) if any(stage in lane[1] for lane in wave))
        threads = next(lane[0] for lane in self.waves[w] if stage in lane[1])
        unit_s = per_step / (sample_cost(stage, self.dims, self.cfg) * sc.batch_size) / self._slowdown(stage, threads)
        remaining = {stage: per_step * steps_left}
        if stage == "generator":
            remaining[stage] += EPS_COST * self.eps_samples * unit_s * self._slowdown(stage, threads)
        total = 0.0
        for i, wave in enumerate(self.waves[w:]):
            lane_s = []
            for lane_threads, lane_stages in wave:
                seconds = 0.0
                after = i > 0 or stage not in lane_stages
                for s in lane_stages:
                    if s == stage:
                        seconds += remaining[s]
                        after = True
                    elif after:
                        units, fixed = stage_units(self.cfg, s, self.eps_samples, self.dims, self.eval_n)
                        remaining[s] = units * unit_s * self._slowdown(s, lane_threads) + fixed
                        seconds += remaining[s]
                if i == 0 and stage not in lane_stages:  # a lane running beside the timed stage
                    seconds = max(seconds - (now - self.wave_t0), 0.0)
                lane_s.append(seconds)
            total += max(lane_s)
        self.estimate = now - self.t0 + total
        if self.enabled:
            parts = ", ".join(f"{s} {v / 60:.1f}" for s, v in remaining.items())
            print(
                f"estimated total time: ~{max(round(self.estimate / 60), 1)} min "
                f"(from {stage} at {per_step:.3f} s/step; minutes left per stage: {parts})",
                flush=True,
            )


class Progress:
    """tqdm bar on a terminal (rank 0, unless ``bar`` is off), a log line every ``every`` steps
    otherwise; feeds the run's ``clock`` when given."""

    def __init__(
        self,
        stage: str,
        total: int,
        start: int,
        enabled: bool,
        every: int,
        clock: RunClock | None = None,
        bar: bool = True,
    ) -> None:
        self.stage, self.total, self.every, self.enabled = stage, total, max(every, 1), enabled
        self.clock = clock
        self.bar: Any = None
        self.t0, self.s0 = time.perf_counter(), start
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, logs: dict[str, float]) -> None:
        if self.clock is not None:
            self.clock.observe(self.stage, step, self.s0, self.total, self.t0)
        if not self.enabled:
            return
        shown = {k: logs[k] for k in list(logs)[:4]}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.stage}] step {step}/{self.total} {text} ({rate:.2f} steps/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
