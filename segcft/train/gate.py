"""The segmentor quality gate (docs/method.md section 6.6): a trained segmentor is measured per
structure variable on the validation split; one that has not learned a structure is trained once
more with another seed and twice the steps, and a run whose segmentor still has not learned it
stops (or, with ``train.segmentor.gate: warn``, goes on with the structure's numbers marked). A
segmentor imported with ``--segmentor-checkpoint`` is measured the same way, without a retry."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from segcft.components import build_dataset
from segcft.config import SegmentorStageConfig, derived_seed
from segcft.errors import UserError
from segcft.evaluation.quality import QUALITY_SAMPLES, not_learned, segmentor_quality
from segcft.train.context import StageContext

__all__ = ["RETRY_SEED_OFFSET", "SegmentorNotLearned", "gate_imported", "gated_segmentor"]

RETRY_SEED_OFFSET = 1_000
"""The retry of a segmentor stage with seed s trains with seed s + RETRY_SEED_OFFSET."""

Train = Callable[[str, int, SegmentorStageConfig], nn.Module]
"""Trains a segmentor: (stage name for checkpoints and metrics, seed, schedule) -> the model."""


class SegmentorNotLearned(UserError):
    """A segmentor that has not learned a structure after its retry (``train.segmentor.gate: stop``)."""


def gated_segmentor(ctx: StageContext, stage: str, seed: int, train: Train) -> tuple[nn.Module, int]:
    """Train the segmentor of ``stage`` through its quality gate; returns the model kept and its
    seed, and records the gate (thresholds, every attempt's quality, the floors) in gates.json."""
    sc: SegmentorStageConfig = ctx.cfg.train.segmentor.for_stage(stage)
    model = train(stage, seed, sc)
    val = _validation_split(ctx, stage)
    if val is None:
        return model, seed
    quality = _measure(ctx, model, val)
    attempts = [{"seed": seed, "steps": sc.steps, "quality": _clean(quality)}]
    bad = not_learned(quality, sc.gate_dice, sc.gate_mape)
    if bad:
        retry_seed = derived_seed(seed + RETRY_SEED_OFFSET)
        if ctx.d.main:
            print(
                f"[{stage}] not learned on the validation split: {_words(quality, bad)}; "
                f"training it once more with seed {retry_seed} and {2 * sc.steps} steps",
                flush=True,
            )
        model, seed = train(ctx.run.retry(stage), retry_seed, replace(sc, steps=2 * sc.steps)), retry_seed
        quality = _measure(ctx, model, val)
        attempts.append({"seed": seed, "steps": 2 * sc.steps, "quality": _clean(quality)})
        bad = not_learned(quality, sc.gate_dice, sc.gate_mape)
    failure = (
        f"segmentor {stage!r} has not learned {_words(quality, bad)} on the validation split, also after a "
        f"retry with seed {seed} and {2 * sc.steps} steps"
    )
    _decide(ctx, stage, quality, attempts, len(val), failure, remedy="train longer or fix the data")
    return model, seed


def gate_imported(ctx: StageContext, stage: str, model: nn.Module, source: Path) -> None:
    """The quality gate of a segmentor imported with ``--segmentor-checkpoint``: measured like a
    trained one and recorded in gates.json, but not retrained; one that has not learned a
    structure stops the run (or, with ``train.segmentor.gate: warn``, is used with its numbers
    marked)."""
    sc: SegmentorStageConfig = ctx.cfg.train.segmentor
    val = _validation_split(ctx, stage)
    if val is None:
        return
    quality = _measure(ctx, model, val)
    bad = not_learned(quality, sc.gate_dice, sc.gate_mape)
    failure = (
        f"the segmentor imported from {source} (--segmentor-checkpoint) has not learned {_words(quality, bad)} "
        "on this run's validation split"
    )
    attempts = [{"source": str(source), "quality": _clean(quality)}]
    _decide(
        ctx,
        stage,
        quality,
        attempts,
        len(val),
        failure,
        remedy="import one that has, or train one (leave out --segmentor-checkpoint)",
    )


def _validation_split(ctx: StageContext, stage: str) -> Any:
    """The validation split the gate measures on; None (and the gate recorded as unchecked)
    when it is empty or has no masks."""
    val = build_dataset(ctx.cfg, "val")
    if len(val) == 0 or val[0].get("mask") is None:
        _record(ctx, stage, {"status": "unchecked", "reason": "the validation split is empty or has no masks"})
        return None
    return val


def _decide(
    ctx: StageContext,
    stage: str,
    quality: dict[str, dict[str, float]],
    attempts: list[dict[str, Any]],
    val_size: int,
    failure: str,
    remedy: str,
) -> None:
    """Record the gate of ``stage`` in gates.json; a segmentor that has not learned a structure
    (``failure``: what happened, ``remedy``: what to do) stops the run (``gate: stop``) or is
    warned about (``gate: warn``)."""
    sc: SegmentorStageConfig = ctx.cfg.train.segmentor
    bad = not_learned(quality, sc.gate_dice, sc.gate_mape)
    active = sc.gate_dice > 0 or sc.gate_mape > 0
    record = {
        "status": "not learned" if bad else "passed" if active else "off",
        "not_learned": bad,
        "thresholds": {"dice": sc.gate_dice, "mape": sc.gate_mape},
        "split": "val",
        "samples": min(val_size, QUALITY_SAMPLES),
        "attempts": attempts,
        "floors": {name: _finite(q["mape"]) for name, q in quality.items()},
    }
    _record(ctx, stage, record)
    if not bad:
        return
    message = f"{failure} (thresholds: Dice >= {sc.gate_dice:.2f}, soft-area MAPE <= {sc.gate_mape:.1f} %)"
    if sc.gate == "stop":
        raise SegmentorNotLearned(f"{message}; {remedy}, or --set train.segmentor.gate=warn")
    if ctx.d.main:
        print(f"warning: {message}; going on (train.segmentor.gate=warn), its numbers marked", flush=True)


def _measure(ctx: StageContext, model: nn.Module, val: Any) -> dict[str, dict[str, float]]:
    """The segmentor's quality on the validation split, measured by rank 0 and shared with every
    rank, so that all ranks take the same decision."""
    quality = segmentor_quality(model, val, ctx.info, ctx.device) if ctx.d.main else {}
    if ctx.d.enabled:
        box = [quality]
        dist.broadcast_object_list(box, src=0)
        quality = box[0]
    return quality


def _record(ctx: StageContext, stage: str, record: dict[str, Any]) -> None:
    if ctx.d.main:
        ctx.run.write_gate(stage, record)
    ctx.d.barrier()


def _words(quality: dict[str, dict[str, float]], names: list[str]) -> str:
    """``structure 'x' (Dice 0.12, soft-area MAPE 45.3 %)``, joined for several."""
    return ", ".join(
        f"structure {n!r} (Dice {quality[n]['dice']:.2f}, soft-area MAPE {quality[n]['mape']:.1f} %)" for n in names
    )


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _clean(quality: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """The quality with NaN as None (strict JSON)."""
    return {n: {k: _finite(v) for k, v in q.items()} for n, q in quality.items()}
