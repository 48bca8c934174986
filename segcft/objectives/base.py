"""The Lagrangian shared by every fine-tuning objective (docs/method.md section 5):

    L = L_guide(x_cf, pa_cf) - (lambda - d * sg(eps - nelbo(x))) * (eps - nelbo(x))

``eps`` is the training-set nelbo of the pre-trained generator (measured by the training
pipeline and stored with the run), ``lambda >= 0`` is a Lagrange multiplier updated by gradient
ascent and clamped at zero after each step, ``d`` is the damping. An objective supplies
L_guide only (``CFTObjective.guide_loss``). Segmentor and regressor are frozen: their weights
never receive gradients, but gradients flow through them into x_cf.

The damping coefficient uses a moving average of the constraint, sg(eps - nelbo) -> sg(c_avg)
(as GECO does, Rezende and Viola 2018): a batch's nelbo differs from eps by about 0.1 nat per
pixel through which images it holds alone, and d = 100 times that noise would otherwise outweigh
the guidance gradient by one to two orders of magnitude (measured on the quick preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segcft.data.variables import DatasetInfo
from segcft.dscm import DSCM, Intervention, permutation_intervention
from segcft.errors import ConfigError
from segcft.objectives.modes import KIND, check_mode
from segcft.plugins import PluginError, get_registry
from segcft.protocols import GUIDES

__all__ = ["CONSTRAINT_AVERAGE", "CFTObjective", "ObjectiveContext", "build_objective"]

CONSTRAINT_AVERAGE = 0.95
"""Decay of the constraint's moving average in the damping coefficient (about 20 batches; it
starts at 0: the pre-trained generator meets eps by construction)."""


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective factory receives besides its own config: the mode it is registered
    as, the dataset's metadata, the run's ``cft`` section (the Lagrangian's settings and the
    built-ins' guidance settings), eps, and the frozen guides its registration asked for
    (None when not needed, or when only used and the run config names none)."""

    mode: str
    info: DatasetInfo
    cft: Any
    eps: float
    segmentor: nn.Module | None = None
    regressor: nn.Module | None = None


class CFTObjective(nn.Module):
    """One fine-tuning mode's Lagrangian on a batch, with its Lagrange multiplier ``lmbda``.

    Subclasses implement ``guide_loss``. ``cfg`` is the run's CFTConfig (lr_lagrange, damping,
    lambda_init and the guidance settings). Frozen guides are stored outside the module's
    parameters so that optimisers and checkpoints of the objective hold only ``lmbda``."""

    lmbda: nn.Parameter
    constraint_avg: torch.Tensor
    segmentor: nn.Module | None
    regressor: nn.Module | None

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__()
        cfg = ctx.cft
        if cfg.damping < 0 or cfg.lr_lagrange <= 0 or cfg.lambda_init < 0:
            raise ConfigError("cft: damping and lambda_init must be >= 0 and lr_lagrange > 0")
        self.mode = ctx.mode
        self.info = ctx.info
        self.cfg = cfg
        self.eps = float(ctx.eps)
        self.lmbda = nn.Parameter(torch.tensor(float(cfg.lambda_init)))
        self.register_buffer("constraint_avg", torch.zeros(()))
        # Plain attributes, not submodules: frozen, outside state_dict() and parameters().
        object.__setattr__(self, "segmentor", _freeze(ctx.segmentor))
        object.__setattr__(self, "regressor", _freeze(ctx.regressor))

    # -- multiplier ---------------------------------------------------------------------------
    def lagrange_optimizer(self) -> torch.optim.Optimizer:
        """Gradient ascent on lambda (Adam, maximize, no weight decay: the reference setting)."""
        return torch.optim.Adam([self.lmbda], lr=self.cfg.lr_lagrange, maximize=True)

    @torch.no_grad()
    def clamp_lambda(self) -> None:
        """Project lambda back onto lambda >= 0 after each ascent step."""
        self.lmbda.clamp_(min=0.0)

    # -- guidance -----------------------------------------------------------------------------
    def guide_loss(
        self,
        x_cf: torch.Tensor,
        pa_cf: torch.Tensor,
        batch: dict[str, torch.Tensor],
        intervened: str,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L_guide for one counterfactual batch (a float32 scalar) and floats to log;
        ``batch`` is the factual batch (image, parents, regions), ``intervened`` the variable."""
        raise NotImplementedError(f"{type(self).__name__} must implement guide_loss")

    # -- full objective -----------------------------------------------------------------------
    def forward(
        self,
        dscm: DSCM,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        intervention: Intervention | None = None,
    ) -> dict[str, Any]:
        """The Lagrangian on one batch: a random permutation intervention (unless given), the
        counterfactual, L_guide and the constraint on the real batch's nelbo.

        Returns ``loss`` (to backpropagate into generator and lambda), ``guide``, ``nelbo``,
        ``constraint`` (eps - nelbo, >= 0 when satisfied), ``lambda`` and the ``variable``."""
        x, pa = batch["image"], batch["parents"]
        do = intervention if intervention is not None else permutation_intervention(self.info, pa, generator)
        x_cf, pa_cf, elbo = dscm.counterfactual_with_elbo(x, pa, do)
        guide, logs = self.guide_loss(x_cf, pa_cf, batch, do.variable)
        nelbo = elbo["loss"].float()
        gap = self.eps - nelbo
        avg = self._average_constraint(gap.detach())
        # d loss / d lambda = -gap, clipped like the average: one batch whose nelbo explodes would
        # otherwise fill Adam's second moment for lambda and freeze it for thousands of steps.
        # The extra term is zero in value and leaves the generator's gradient as it was.
        lmbda = self.lmbda.detach()
        loss = guide - (lmbda - self.cfg.damping * avg) * gap - (self.lmbda - lmbda) * self._clip(gap.detach())
        return {
            "loss": loss,
            "guide": float(guide.detach()),
            "nelbo": float(nelbo.detach()),
            "constraint": float(gap.detach()),
            "constraint_avg": float(avg),
            "lambda": float(self.lmbda.detach()),
            "variable": do.variable,
            **logs,
        }

    def _clip(self, gap: torch.Tensor) -> torch.Tensor:
        """One batch's constraint bounded to +-max(|eps|, 1), as the damping and lambda take it."""
        bound = max(abs(self.eps), 1.0)
        return gap.clamp(-bound, bound)

    @torch.no_grad()
    def _average_constraint(self, gap: torch.Tensor) -> torch.Tensor:
        """Fold this batch's constraint (averaged over ranks under DDP) into the moving average
        while training; return the average the damping uses. A non-finite constraint (a batch
        whose nelbo overflowed: the stepper skips that update) leaves the average as it was,
        or every later loss would be NaN and every later update skipped. A finite one enters
        clipped to +-max(|eps|, 1): a batch whose nelbo is a billion times its bound would otherwise
        make the damping coefficient so large that every later gradient overflows and every later
        update is skipped (a 3D Pos-Seg-CFT run stopped learning at step 650 of 1200 that way)."""
        if not self.training:
            return self.constraint_avg.clone()
        if dist.is_available() and dist.is_initialized():
            gap = gap.clone()
            dist.all_reduce(gap)
            gap /= dist.get_world_size()
        gap = gap.to(self.constraint_avg)
        folded = CONSTRAINT_AVERAGE * self.constraint_avg + (1.0 - CONSTRAINT_AVERAGE) * self._clip(gap)
        self.constraint_avg.copy_(torch.where(torch.isfinite(gap), folded, self.constraint_avg))
        return self.constraint_avg.clone()


def build_objective(
    mode: str,
    info: DatasetInfo,
    cft: Any,
    eps: float,
    segmentor: nn.Module | None = None,
    regressor: nn.Module | None = None,
) -> CFTObjective:
    """The objective registered as ``mode``, built by its factory ``build(config, ctx)`` with its
    config from ``cft.objectives`` (else its defaults); ConfigError when the dataset or the
    guides do not meet what it needs, PluginError when the factory returns no CFTObjective."""
    check_mode(mode, info)
    entry = get_registry().get(KIND, mode)
    guides = {"segmentor": segmentor, "regressor": regressor}
    for kind in GUIDES:
        if kind in entry.needs and guides[kind] is None:
            raise ConfigError(f"cft.modes: {mode!r} needs a trained {kind} ({kind}.name)")
    settings = getattr(cft, "objectives", {})
    params = settings[mode] if mode in settings else entry.config()
    objective = entry.load()(params, ObjectiveContext(mode, info, cft, float(eps), segmentor, regressor))
    if not isinstance(objective, CFTObjective):
        raise PluginError(
            f"objective {mode!r} (plugin {entry.plugin}): the factory returned {type(objective).__name__}, "
            f"not a segcft.objectives.base.CFTObjective"
        )
    return objective


def _freeze(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    module.eval()
    module.requires_grad_(False)
    return module
