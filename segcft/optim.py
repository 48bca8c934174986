"""Training support shared by every stage: AdamW with linear warm-up, an EMA of the weights,
and guarded updates (gradient clipping; skipping of non-finite or outlier gradients, counted).

The recipe follows the reference HVAE training (docs/method.md section 3.2): AdamW with betas
(0.9, 0.9), a learning rate that warms up linearly and then stays constant, gradients clipped
at ``grad_clip``, updates skipped when the gradient norm is >= ``grad_skip`` or not finite, and
an EMA whose decay ramps as 1 - 1/(1 + k) up to the configured rate.
"""

from __future__ import annotations

import copy
import itertools
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


def cosine_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier of a cosine decay over ``steps`` optimiser steps: 1 at step 0,
    falling to 0 at step ``steps`` (and after); 1 throughout when ``steps`` <= 0."""
    if steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def build_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    warmup: int = 0,
    betas: tuple[float, float] = (0.9, 0.9),
    decay_steps: int = 0,
) -> tuple[FlatAdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule: the linear warm-up, times a cosine decay to 0 over ``decay_steps``
    when that is > 0 (step the schedule once per applied update)."""
    optimizer = FlatAdamW(list(params), lr=lr, weight_decay=weight_decay, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_factor(step, warmup) * cosine_factor(step, decay_steps)
    )
    return optimizer, scheduler


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of ``numel`` consecutive storage slots exactly once
    (any dense layout: contiguous, channels-last, ...), so that it can live in a slice of a flat
    buffer with its own strides."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped and strided like each tensor of ``like``, back to back."""
    out, offset = [], 0
    for t in like:
        out.append(torch.as_strided(flat, t.shape, t.stride(), offset))
        offset += t.numel()
    return out


_ADAMW_FLAGS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}
"""The options of ``torch.optim.AdamW`` that FlatAdamW's maths has fixed, kept in its param group
so that a saved state loads into either class with the same meaning."""


class FlatAdamW(torch.optim.Optimizer):
    """AdamW whose parameters, gradients and moments live in flat buffers (one of each).

    On a CPU, ``foreach`` optimisers loop over the tensors one by one: a model of ~400 small
    tensors spent ~12 ms of a 250 ms generator step in the optimiser alone, most of it per-tensor
    dispatch. Here the update is nine element-wise ops on one buffer, and clipping
    (:meth:`grad_tensors`) and the EMA (:class:`EMA`) read the same buffers. The maths is torch's
    AdamW (decoupled weight decay, bias-corrected moments, same op order) element for element.

    At the first :meth:`step` the parameters that have a gradient become *members*: their data
    and gradients are rebound to views of the flat buffers (same shapes and strides), and
    :meth:`zero_grad` zeroes the gradient buffer instead of dropping it. The others (no
    gradient then, a different dtype or device, or restored moments of another step count) are
    updated one by one as torch's AdamW would, whenever they have a gradient. A member is always
    updated, with a zero gradient if the loss did not reach it (AdamW after
    ``zero_grad(set_to_none=False)``). ``state_dict`` has torch AdamW's per-parameter layout, so
    checkpoints move freely between this class and ``torch.optim.AdamW``."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, **_ADAMW_FLAGS}
        super().__init__(list(params), defaults)
        if len(self.param_groups) != 1:
            raise ValueError("FlatAdamW takes one parameter group")
        self.members: list[torch.Tensor] = []
        self._flat: dict[str, torch.Tensor] = {}
        self._step_t: torch.Tensor | None = None
        self._ptrs: list[tuple[int, int]] = []
        self._others: list[torch.Tensor] = list(self.param_groups[0]["params"])

    @property
    def flat_params(self) -> torch.Tensor | None:
        """The buffer the members' data are views of (None before the first step)."""
        return self._flat.get("param")

    def _flatten(self) -> None:
        """Make the parameters that have a gradient now (and a common step count) members."""
        params = self.param_groups[0]["params"]
        with_grad = [p for p in params if p.grad is not None and not p.grad.is_sparse and _dense(p) and _dense(p.grad)]
        if not with_grad:
            return
        first = with_grad[0]
        steps = [float(self.state[p]["step"]) if "step" in self.state[p] else 0.0 for p in with_grad]
        common = max(set(steps), key=steps.count)
        members = [
            p
            for p, step in zip(with_grad, steps)
            if p.dtype == first.dtype and p.device == first.device and step == common
        ]
        n = sum(p.numel() for p in members)
        keys = ("param", "grad", "exp_avg", "exp_avg_sq", "denom")
        flat = {k: torch.zeros(n, dtype=first.dtype, device=first.device) for k in keys}
        params_view, grads_view = _views(flat["param"], members), _views(flat["grad"], members)
        with torch.no_grad():
            for p, data, grad in zip(members, params_view, grads_view):
                data.copy_(p)
                grad.copy_(p.grad)
                p.data, p.grad = data, grad
        self.members, self._flat = members, flat
        self._step_t = torch.tensor(common, dtype=torch.float32)
        self._adopt_moments()
        inside = {id(p) for p in members}
        self._others = [p for p in params if id(p) not in inside]
        self._ptrs = [(p.data_ptr(), p.grad.data_ptr()) for p in members]

    def _check_members(self) -> None:
        """Members whose data moved (``.to()``, ``.data =``) cannot be updated through the flat
        buffer: say so. A gradient that was dropped and created anew is copied back into it."""
        grads: list[torch.Tensor] = []
        for i, (p, (data_ptr, grad_ptr)) in enumerate(zip(self.members, self._ptrs)):
            if p.data_ptr() != data_ptr:
                raise RuntimeError(
                    "FlatAdamW: a parameter was moved or replaced after the first step; build the "
                    "optimizer after moving the model"
                )
            g = p.grad
            if g is None or g.data_ptr() != grad_ptr:
                grads = grads or _views(self._flat["grad"], self.members)
                with torch.no_grad():
                    if g is None:
                        grads[i].zero_()
                    else:
                        grads[i].copy_(g)
                p.grad = grads[i]

    def grad_tensors(self) -> list[torch.Tensor]:
        """Every gradient the next step will use: the flat buffer and the non-members' own."""
        self.prepare()
        grads = [self._flat["grad"]] if self._flat else []
        return grads + [p.grad for p in self._others if p.grad is not None]

    def prepare(self) -> None:
        """Gather the gradients into the flat buffer (flattening on the first call)."""
        if not self._flat:
            self._flatten()
        else:
            self._check_members()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One AdamW update of every member and of every non-member that has a gradient."""
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        self.prepare()
        group = self.param_groups[0]
        if self._flat and self._step_t is not None:
            f = self._flat
            self._adamw(group, f["param"], f["grad"], f["exp_avg"], f["exp_avg_sq"], self._step_t, f["denom"])
        for p in self._others:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(
                    step=torch.tensor(0.0, dtype=torch.float32),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
            self._adamw(group, p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])

    @staticmethod
    def _adamw(
        group: dict[str, Any],
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step_t: torch.Tensor,
        scratch: torch.Tensor | None = None,
    ) -> None:
        """torch's AdamW update (its foreach path's op order) on one tensor; ``scratch``, shaped
        like ``param``, spares a fresh allocation (and its page faults) per step."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_t += 1
        step = float(step_t)
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2)
        exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
        step_size = (lr / (1 - beta1**step)) * -1
        denom = exp_avg_sq.sqrt() if scratch is None else torch.sqrt(exp_avg_sq, out=scratch)
        denom.div_((1 - beta2**step) ** 0.5)
        denom.add_(eps)
        param.addcdiv_(exp_avg, denom, value=step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the members' gradient buffer (their gradients stay views of it); the others'
        gradients are dropped (``set_to_none``) or zeroed."""
        if self._flat:
            self._flat["grad"].zero_()
        for p in self._others:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch AdamW's per-parameter layout; each parameter gets its own step tensor (the
        members share one here, and AdamW would count a shared one once per parameter)."""
        state = super().state_dict()
        state["state"] = {k: {**v, "step": v["step"].clone()} for k, v in state["state"].items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch AdamW's per-parameter state (from this class or ``torch.optim.AdamW``)."""
        super().load_state_dict(state_dict)
        if not self._flat:
            return
        step = {float(self.state[p]["step"]) for p in self.members if "step" in self.state[p]}
        if len(step) > 1:
            raise ValueError("FlatAdamW.load_state_dict: the members' step counts differ")
        self._step_t.fill_(step.pop() if step else 0.0)  # type: ignore[union-attr]
        self._adopt_moments()

    def _adopt_moments(self) -> None:
        """Copy the members' per-parameter moments (zero where there are none) into the flat
        buffers and point their state at views of them and at the shared step count."""
        views = {k: _views(self._flat[k], self.members) for k in ("exp_avg", "exp_avg_sq")}
        with torch.no_grad():
            for i, p in enumerate(self.members):
                state = self.state[p]
                for k, v in views.items():
                    if k in state:
                        v[i].copy_(state[k])
                    else:
                        v[i].zero_()
                self.state[p] = {
                    "step": self._step_t,
                    "exp_avg": views["exp_avg"][i],
                    "exp_avg_sq": views["exp_avg_sq"][i],
                }


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
        self._flat: torch.Tensor | None = None
        self._flat_indices: tuple[int, ...] = ()

    def decay(self) -> float:
        """The decay the next update uses."""
        return min(self.rate, 1.0 - 1.0 / (1.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, flat: tuple[torch.Tensor, tuple[int, ...]] | None = None) -> None:
        """Move the average towards ``model``'s current weights. ``flat``: a buffer holding the
        parameters at these positions of ``model.parameters()`` back to back, each in its own
        layout (a :class:`FlatAdamW`'s, see :meth:`GuardedStepper.step`): they are averaged in
        one op, the others one by one."""
        d = self.decay()
        ema_params: list[torch.Tensor] = list(self.module.parameters())
        if flat is None:
            params = [p.detach() for p in model.parameters()]
            if len(ema_params) != len(params):
                raise ValueError("EMA.update: the model does not match the averaged module")
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:
            buffer, indices = flat
            if self._flat_indices != indices:
                self._flatten([ema_params[i] for i in indices], indices)
            assert self._flat is not None and self._flat.numel() == buffer.numel()
            self._flat.lerp_(buffer, 1.0 - d)
            if len(indices) < len(ema_params):
                inside = set(indices)
                rest = [i for i in range(len(ema_params)) if i not in inside]
                params = list(model.parameters())
                torch._foreach_lerp_([ema_params[i] for i in rest], [params[i].detach() for i in rest], 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def _flatten(self, params: list[torch.Tensor], indices: tuple[int, ...]) -> None:
        """Rebind ``params`` (of the frozen copy) to views of one buffer laid out as FlatAdamW
        lays out the model's."""
        self._flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for p, view in zip(params, _views(self._flat, params)):
                view.copy_(p)
                p.data = view
        self._flat_indices = indices

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
        self._flat_key = -1
        self._flat_indices: tuple[int, ...] | None = None

    def step(self, loss: torch.Tensor | None = None) -> StepResult:
        """Apply (or skip) the update for the gradients already accumulated; zero them after."""
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        if isinstance(self.optimizer, FlatAdamW):  # a few buffers instead of one tensor per parameter
            grads = self.optimizer.grad_tensors()
            # the norm of the per-tensor norms, as clip_grad_norm_ (torch.nn.utils.get_total_norm needs torch >= 2.6)
            total = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else torch.tensor(0.0)
            )
            torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
            norm = float(total)
        else:
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
                self.ema.update(self.model, self._flat_model_params())  # type: ignore[arg-type]
            self.counts["applied"] += 1
            self.counts["clipped"] += int(norm > max_norm)
            result = StepResult(norm, False)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _flat_model_params(self) -> tuple[torch.Tensor, tuple[int, ...]] | None:
        """The optimiser's flat parameter buffer and the positions in ``model.parameters()`` of
        the parameters it holds, when it holds them in that order (the EMA then averages the
        buffer at once)."""
        opt = self.optimizer
        if not isinstance(opt, FlatAdamW) or opt.flat_params is None or self.model is None:
            return None
        if self._flat_key != len(opt.members):
            position = {id(p): i for i, p in enumerate(self.model.parameters())}
            indices = tuple(position.get(id(p), -1) for p in opt.members)
            ordered = all(a < b for a, b in itertools.pairwise(indices)) and (not indices or indices[0] >= 0)
            self._flat_indices = indices if ordered else None
            self._flat_key = len(opt.members)
        return None if self._flat_indices is None else (opt.flat_params, self._flat_indices)

    @property
    def skipped(self) -> int:
        """Updates skipped so far, for either reason."""
        return self.counts["skipped_nonfinite"] + self.counts["skipped_norm"]

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = {k: int(state.get(k, 0)) for k in self.counts}


__all__ = ["EMA", "FlatAdamW", "GuardedStepper", "StepResult", "build_optimizer", "cosine_factor", "warmup_factor"]
