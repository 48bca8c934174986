"""Resume state of a training stage: what ``checkpoints/<stage>.last.pt`` holds and how it is
put back, so that an interrupted stage continues bitwise as if it had not stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segcft.checkpoint import capture_rng, load_checkpoint, load_model_state, restore_rng
from segcft.distributed import Dist
from segcft.errors import UserError
from segcft.optim import EMA, GuardedStepper

__all__ = ["TrainState", "capture_state", "restore_state"]


@dataclass
class TrainState:
    """Everything the next steps of a stage depend on, and the partial sums of the next
    metrics row (the steps since the last one)."""

    model: nn.Module
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    stepper: GuardedStepper
    ema: EMA | None
    extra_opt: torch.optim.Optimizer | None
    rng: torch.Generator | None
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0


def capture_state(ts: TrainState, stage: str, d: Dist) -> dict[str, Any] | None:
    """The resume state after ``ts.step`` with the RNG states of every rank (global ones and the
    stage's own generator), gathered on every rank; rank 0 gets the checkpoint dict, others None."""
    rng_states = [(capture_rng(), None if ts.rng is None else ts.rng.get_state())]
    if d.enabled:
        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
    if not d.main:
        return None
    state: dict[str, Any] = {
        "stage": stage,
        "step": ts.step,
        "model": ts.model.state_dict(),
        "optimizer": ts.opt.state_dict(),
        "scheduler": ts.sched.state_dict(),
        "stepper": ts.stepper.state_dict(),
        "rng": [r for r, _ in rng_states],
        "log_sums": dict(ts.sums),
        "log_count": ts.count,
    }
    if ts.ema is not None:
        state["ema"] = ts.ema.state_dict()
    if ts.extra_opt is not None:
        state["extra_optimizer"] = ts.extra_opt.state_dict()
        state["loss_fn"] = ts.loss_fn.state_dict()
    if ts.rng is not None:
        state["generator"] = [g for _, g in rng_states]
    return state


def restore_state(ts: TrainState, path: Path, stage: str, d: Dist) -> None:
    """Put the resume state in ``path`` back into ``ts`` (this rank's RNG states); a file that is
    not a resume state of this stage raises UserError naming it."""
    state = load_checkpoint(path)
    load_model_state(ts.model, state, path, f"{stage} stage's {type(ts.model).__name__}")
    try:
        ts.opt.load_state_dict(state["optimizer"])
        ts.sched.load_state_dict(state["scheduler"])
        if ts.ema is not None:
            ts.ema.load_state_dict(state["ema"])
        ts.stepper.load_state_dict(state["stepper"])
        if ts.extra_opt is not None:
            ts.extra_opt.load_state_dict(state["extra_optimizer"])
            ts.loss_fn.load_state_dict(state["loss_fn"])
        if ts.rng is not None:
            generators = state["generator"] if isinstance(state["generator"], list) else [state["generator"]]
            ts.rng.set_state(generators[min(d.rank, len(generators) - 1)])
        restore_rng(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        ts.step = int(state["step"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        detail = f"no {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {path}: not a resume state of this run's {stage} stage: {detail}") from None
    ts.sums, ts.count = dict(state.get("log_sums", {})), int(state.get("log_count", 0))
