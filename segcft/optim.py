"""Training support shared by every stage: AdamW with linear warm-up, an EMA of the weights,
and guarded updates (gradient clipping; skipping of non-finite or outlier gradients, counted).

The recipe follows the reference HVAE training (docs/method.md section 3.2): AdamW with betas
(0.9, 0.9), a learning rate that warms up linearly and then stays constant, gradients clipped
at ``grad_clip``, updates skipped when the gradient norm is >= ``grad_skip`` or not finite, and
an EMA whose decay ramps as 1 - 1/(1 + k) up to the configured rate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def warmup_factor(step: int, warmup: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): (step + 1) / warmup during
    the warm-up, then 1."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup)


def build_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    warmup: int = 0,
    betas: tuple[float, float] = (0.9, 0.9),
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its linear warm-up schedule (step the schedule once per applied update)."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))
    return optimizer, scheduler


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    After k updates the decay is min(rate, 1 - 1/(1 + k)): the first update copies the weights
    and early averages are not dominated by the random initialisation. ``module`` is a frozen
    copy holding the averaged weights, ready for evaluation and checkpoints."""

    def __init__(self, model: nn.Module, rate: float = 0.999) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self) -> float:
        """The decay the next update uses."""
        return min(self.rate, 1.0 - 1.0 / (1.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        d = self.decay()
        ema_params: list[torch.Tensor] = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the model does not match the averaged module")
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        """Averaged weights and the update count (tensors and ints only: safe to load with
        ``weights_only=True``)."""
        return {"module": self.module.state_dict(), "updates": self.updates, "rate": self.rate}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (as loaded from a checkpoint, hence untyped)."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.rate = float(state["rate"])


@dataclass
class StepResult:
    """What one guarded update did: the gradient norm before clipping and whether (and why)
    the update was skipped ("nonfinite" or "norm")."""

    grad_norm: float
    skipped: bool
    reason: str | None = None


class GuardedStepper:
    """Clips gradients, skips bad updates, steps optimiser, schedule and EMA, and counts.

    ``grad_clip`` <= 0 disables clipping and ``grad_skip`` <= 0 disables the outlier skip (a
    non-finite loss or gradient is always skipped). ``counts`` holds ``applied``,
    ``skipped_nonfinite`` and ``skipped_norm`` for the trainer's log, and ``clipped``: the
    applied updates whose gradient norm exceeded ``grad_clip``."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_clip: float = 0.0,
        grad_skip: float = 0.0,
        ema: EMA | None = None,
        model: nn.Module | None = None,
    ) -> None:
        if ema is not None and model is None:
            raise ValueError("GuardedStepper: an EMA needs the model it averages")
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.grad_skip = grad_skip
        self.ema = ema
        self.model = model
        self.counts = {"applied": 0, "skipped_nonfinite": 0, "skipped_norm": 0, "clipped": 0}

    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        """Apply (or skip) the update for the gradients already accumulated; zero them after."""
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        finite = math.isfinite(norm) and (loss is None or bool(torch.isfinite(loss.detach()).all()))
        if not finite:
            result = StepResult(norm, True, "nonfinite")
            self.counts["skipped_nonfinite"] += 1
        elif self.grad_skip > 0 and norm >= self.grad_skip:
            result = StepResult(norm, True, "norm")
            self.counts["skipped_norm"] += 1
        else:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)  # type: ignore[arg-type]
            self.counts["applied"] += 1
            self.counts["clipped"] += int(norm > max_norm)
            result = StepResult(norm, False)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    @property
    def skipped(self) -> int:
        """Updates skipped so far, for either reason."""
        return self.counts["skipped_nonfinite"] + self.counts["skipped_norm"]

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = {k: int(state.get(k, 0)) for k in self.counts}


__all__ = ["EMA", "GuardedStepper", "StepResult", "build_optimizer", "warmup_factor"]
