"""Counterfactual fine-tuning objectives (docs/method.md section 5): none, reg, seg, pos-seg.

    L = L_guide(x_cf, pa_cf) - (lambda - d * sg(eps - nelbo(x))) * (eps - nelbo(x))

``eps`` is the training-set nelbo of the pre-trained generator (measured by the training
pipeline and stored with the run), ``lambda >= 0`` is a Lagrange multiplier updated by gradient
ascent and clamped at zero after each step, ``d`` is the damping. Segmentor and regressor are
frozen: their weights never receive gradients, but gradients flow through them into x_cf.

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
from segcft.dscm import DSCM, Intervention, affected_mask, permutation_intervention
from segcft.errors import ConfigError

__all__ = ["MODES", "AreaTerms", "CFTObjective", "applicable_modes", "area_terms", "check_mode"]

MODES: tuple[str, ...] = ("none", "reg", "seg", "pos-seg")
PENALTIES: tuple[str, ...] = ("l1", "l2", "huber")
CONSTRAINT_AVERAGE = 0.95
"""Decay of the constraint's moving average in the damping coefficient (about 20 batches; it
starts at 0: the pre-trained generator meets eps by construction)."""


def applicable_modes(info: DatasetInfo, has_regressor: bool = True) -> list[str]:
    """The modes that make sense for a dataset: pos-seg needs regions, seg needs structures."""
    modes = ["none"]
    if has_regressor:
        modes.append("reg")
    if info.structure_variables:
        modes.append("seg")
        if info.regions and any(v.measure and v.measure.region for v in info.structure_variables):
            modes.append("pos-seg")
    return modes


def check_mode(mode: str, info: DatasetInfo) -> None:
    """Raise ConfigError with one line when ``mode`` is unknown or impossible for ``info``."""
    if mode not in MODES:
        raise ConfigError(f"cft.modes: unknown fine-tuning mode {mode!r}; expected one of {list(MODES)}")
    if mode in ("seg", "pos-seg") and not info.structure_variables:
        raise ConfigError(f"cft.modes: {mode!r} needs structure variables; dataset {info.name!r} has none")
    if mode == "pos-seg" and not info.regions:
        raise ConfigError(f"cft.modes: 'pos-seg' needs a dataset with regions; dataset {info.name!r} has none")


@dataclass(frozen=True)
class AreaTerms:
    """The soft-area terms of a seg/pos-seg objective.

    Term k measures ``index[k] = (class, region or -1)``; its target is the sum of the physical
    counterfactual values of the variables ``members[k]`` and its scale ``scale[k]`` (physical
    units) turns the error into normalised units."""

    index: torch.Tensor  # (K, 2) int64
    scale: torch.Tensor  # (K,) float32
    members: tuple[tuple[int, ...], ...]
    regional: bool

    def targets(self, info: DatasetInfo, pa_norm: torch.Tensor) -> torch.Tensor:
        """(B, P) normalised values -> (B, K) physical targets."""
        phys = info.denormalise(pa_norm.float())
        return torch.stack([phys[:, list(m)].sum(1) for m in self.members], dim=1)

    def measure(self, areas: torch.Tensor) -> torch.Tensor:
        """Pick the terms from ``soft_area`` output (B, C) or (B, C, R) -> (B, K)."""
        cols = []
        for c, r in self.index.tolist():
            if areas.dim() == 2:
                cols.append(areas[:, c])
            else:
                cols.append(areas[:, c].sum(-1) if r < 0 else areas[:, c, r])
        return torch.stack(cols, dim=1)

    def affected(self, changed: torch.Tensor) -> torch.Tensor:
        """(P,) bool of changed variables -> (K,) bool of terms whose target changes."""
        return torch.stack([changed[list(m)].any() for m in self.members])


def area_terms(info: DatasetInfo, mode: str) -> AreaTerms:
    """Soft-area terms of every structure variable.

    pos-seg: one term per variable, regional ones at (class, region). seg: whole-structure
    variables at (class, -1); a structure described only by regional variables gets one term
    whose target is their sum (its regions are taken to cover it) and whose scale is the root
    of the summed variances (choice)."""
    regional = mode == "pos-seg"
    rows: list[tuple[int, int]] = []
    scales: list[float] = []
    members: list[tuple[int, ...]] = []
    grouped: dict[int, list[int]] = {}
    whole: set[int] = set()
    std = info.normalisation.std
    for v in info.structure_variables:
        assert v.measure is not None
        j = info.index(v.name)
        c = info.class_index(v.measure.structure)
        if v.measure.region is None:
            rows.append((c, -1))
            scales.append(std[j])
            members.append((j,))
            whole.add(c)
        elif regional:
            rows.append((c, info.region_id(v.measure.region)))
            scales.append(std[j])
            members.append((j,))
        else:
            grouped.setdefault(c, []).append(j)
    for c, js in grouped.items():
        if c in whole:
            continue
        rows.append((c, -1))
        scales.append(sum(std[j] ** 2 for j in js) ** 0.5)
        members.append(tuple(js))
    return AreaTerms(
        index=torch.tensor(rows, dtype=torch.int64).reshape(-1, 2),
        scale=torch.tensor(scales, dtype=torch.float32),
        members=tuple(members),
        regional=regional,
    )


class CFTObjective(nn.Module):
    """One fine-tuning mode's loss on a batch, with its Lagrange multiplier ``lmbda``.

    ``cfg`` is the run's CFTConfig (lr_lagrange, damping, lambda_init, penalty, huber_delta,
    soft_labels, seg_weight, reg_weight). Frozen guides are stored outside the module's
    parameters so that optimisers and checkpoints of the objective hold only ``lmbda``."""

    def __init__(
        self,
        mode: str,
        info: DatasetInfo,
        cfg: Any,
        eps: float,
        segmentor: nn.Module | None = None,
        regressor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_mode(mode, info)
        if mode == "none":
            raise ConfigError("cft.modes: 'none' is the pre-trained generator; it has no objective")
        if mode == "reg" and regressor is None:
            raise ConfigError("cft.modes: 'reg' needs a trained regressor (regressor.name)")
        if mode in ("seg", "pos-seg") and segmentor is None:
            raise ConfigError(f"cft.modes: {mode!r} needs a segmentor (segmentor.name)")
        if cfg.penalty not in PENALTIES:
            raise ConfigError(f"cft.penalty: unknown penalty {cfg.penalty!r}; expected one of {list(PENALTIES)}")
        if cfg.damping < 0 or cfg.lr_lagrange <= 0 or cfg.lambda_init < 0:
            raise ConfigError("cft: damping and lambda_init must be >= 0 and lr_lagrange > 0")
        self.mode = mode
        self.info = info
        self.cfg = cfg
        self.eps = float(eps)
        self.lmbda = nn.Parameter(torch.tensor(float(cfg.lambda_init)))
        self.register_buffer("constraint_avg", torch.zeros(()))
        # Plain attributes, not submodules: frozen, outside state_dict() and parameters().
        object.__setattr__(self, "segmentor", _freeze(segmentor))
        object.__setattr__(self, "regressor", _freeze(regressor))
        self.terms = area_terms(info, mode) if mode in ("seg", "pos-seg") else None
        n = len(info.variables)
        if mode == "reg":
            reg_vars = torch.ones(n, dtype=torch.bool)
        else:
            reg_vars = torch.tensor([not v.is_structure for v in info.variables], dtype=torch.bool)
            if regressor is None:
                reg_vars[:] = False
        self.register_buffer("reg_vars", reg_vars, persistent=False)

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
        """L_guide for one counterfactual batch; ``batch`` is the factual batch (image, regions)."""
        changed = affected_mask(self.info, intervened, device=pa_cf.device)
        total = x_cf.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        if self.terms is not None:
            seg = self._seg_loss(x_cf, pa_cf, batch, changed)
            total = total + self.cfg.seg_weight * seg
            logs["seg"] = float(seg.detach())
        if bool(self.reg_vars.any()):
            reg = self._reg_loss(x_cf, pa_cf, batch, changed)
            total = total + self.cfg.reg_weight * reg
            logs["reg"] = float(reg.detach())
        return total, logs

    def _seg_loss(
        self, x_cf: torch.Tensor, pa_cf: torch.Tensor, batch: dict[str, torch.Tensor], changed: torch.Tensor
    ) -> torch.Tensor:
        from segcft.ops import area_loss, soft_area

        terms = self.terms
        assert terms is not None
        regions = batch.get("regions") if terms.regional else None
        num_regions = self.info.num_regions if terms.regional else 0
        device = x_cf.device
        index, scale = terms.index.to(device), terms.scale.to(device)
        targets = terms.targets(self.info, pa_cf).to(device)
        if self.cfg.soft_labels:
            with torch.no_grad():
                areas = soft_area(
                    self.segmentor(batch["image"]), spacing=tuple(self.info.spacing),
                    regions=regions, num_regions=num_regions,
                )
            keep = ~terms.affected(changed)
            targets = torch.where(keep.unsqueeze(0), terms.measure(areas).float(), targets)
        weights = torch.ones_like(targets)
        logits = self.segmentor(x_cf)
        return area_loss(
            logits, targets, weights, index, scale, penalty=self.cfg.penalty,
            spacing=tuple(self.info.spacing), regions=regions, num_regions=num_regions,
            huber_delta=self.cfg.huber_delta,
        )

    def _reg_loss(
        self, x_cf: torch.Tensor, pa_cf: torch.Tensor, batch: dict[str, torch.Tensor], changed: torch.Tensor
    ) -> torch.Tensor:
        targets = pa_cf.float()
        if self.cfg.soft_labels:
            with torch.no_grad():
                pred = self.regressor(batch["image"])["loc"].float()
            binary = torch.tensor([v.type == "binary" for v in self.info.variables], device=pred.device)
            soft = torch.where(binary, torch.sigmoid(pred), pred)
            targets = torch.where(changed.unsqueeze(0), targets, soft)
        nll = self.regressor.nll(x_cf, targets).float()
        return nll[:, self.reg_vars.to(nll.device)].sum(1).mean()

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
        loss = guide - (self.lmbda - self.cfg.damping * avg) * gap
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


    @torch.no_grad()
    def _average_constraint(self, gap: torch.Tensor) -> torch.Tensor:
        """Fold this batch's constraint (averaged over ranks under DDP) into the moving average
        while training; return the average the damping uses."""
        if not self.training:
            return self.constraint_avg.clone()
        if dist.is_available() and dist.is_initialized():
            gap = gap.clone()
            dist.all_reduce(gap)
            gap /= dist.get_world_size()
        self.constraint_avg.mul_(CONSTRAINT_AVERAGE).add_((1.0 - CONSTRAINT_AVERAGE) * gap.to(self.constraint_avg))
        return self.constraint_avg.clone()


def _freeze(module: nn.Module | None) -> nn.Module | None:
    if module is None:
        return None
    module.eval()
    module.requires_grad_(False)
    return module
