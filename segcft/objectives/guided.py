"""The built-in objectives: guidance by the frozen segmentor's soft areas (seg, pos-seg) and by
the frozen regressor's likelihood (reg; also the subject-level variables of seg and pos-seg when
the run has a regressor). Their settings are the ``cft`` section's penalty, huber_delta,
soft_labels, seg_weight and reg_weight."""

from __future__ import annotations

from typing import Any

import torch

from segcft.dscm import affected_mask
from segcft.errors import ConfigError
from segcft.objectives.area import AreaTerms, area_terms
from segcft.objectives.base import CFTObjective, ObjectiveContext

__all__ = ["PENALTIES", "GuidedObjective", "build_pos_seg", "build_reg", "build_seg", "pretrained"]

PENALTIES: tuple[str, ...] = ("l1", "l2", "huber")


class GuidedObjective(CFTObjective):
    """L_guide = seg_weight * area loss of ``terms`` (if any) + reg_weight * regressor NLL of the
    variables ``reg_vars`` (if any)."""

    terms: AreaTerms | None
    reg_vars: torch.Tensor

    def __init__(self, ctx: ObjectiveContext, terms: AreaTerms | None, reg_vars: torch.Tensor) -> None:
        if ctx.cft.penalty not in PENALTIES:
            raise ConfigError(f"cft.penalty: unknown penalty {ctx.cft.penalty!r}; expected one of {list(PENALTIES)}")
        super().__init__(ctx)
        self.terms = terms
        self.register_buffer("reg_vars", reg_vars, persistent=False)

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

        terms, segmentor = self.terms, self.segmentor
        assert terms is not None and segmentor is not None
        regions = batch.get("regions") if terms.regional else None
        num_regions = self.info.num_regions if terms.regional else 0
        device = x_cf.device
        index, scale = terms.index.to(device), terms.scale.to(device)
        targets = terms.targets(self.info, pa_cf).to(device)
        if self.cfg.soft_labels:
            with torch.no_grad():
                areas = soft_area(
                    segmentor(batch["image"]),
                    spacing=tuple(self.info.spacing),
                    regions=regions,
                    num_regions=num_regions,
                )
            keep = ~terms.affected(changed)
            targets = torch.where(keep.unsqueeze(0), terms.measure(areas).float(), targets)
        weights = torch.ones_like(targets)
        logits = segmentor(x_cf)
        return area_loss(
            logits,
            targets,
            weights,
            index,
            scale,
            penalty=self.cfg.penalty,
            spacing=tuple(self.info.spacing),
            regions=regions,
            num_regions=num_regions,
            huber_delta=self.cfg.huber_delta,
        )

    def _reg_loss(
        self, x_cf: torch.Tensor, pa_cf: torch.Tensor, batch: dict[str, torch.Tensor], changed: torch.Tensor
    ) -> torch.Tensor:
        regressor = self.regressor
        assert regressor is not None
        targets = pa_cf.float()
        if self.cfg.soft_labels:
            with torch.no_grad():
                pred = regressor(batch["image"])["loc"].float()
            binary = torch.tensor([v.type == "binary" for v in self.info.variables], device=pred.device)
            soft = torch.where(binary, torch.sigmoid(pred), pred)
            targets = torch.where(changed.unsqueeze(0), targets, soft)
        nll = regressor.nll(x_cf, targets).float()  # type: ignore[operator]  # Regressor protocol
        return nll[:, self.reg_vars.to(nll.device)].sum(1).mean()


def _subject_variables(ctx: ObjectiveContext) -> torch.Tensor:
    """(P,) bool: the variables that are not structure areas, when the run has a regressor."""
    mask = torch.tensor([not v.is_structure for v in ctx.info.variables], dtype=torch.bool)
    return mask if ctx.regressor is not None else torch.zeros_like(mask)


def pretrained(config: Any, ctx: ObjectiveContext) -> CFTObjective:
    """Mode none: the pre-trained generator itself, evaluated as is (no fine-tuning stage)."""
    raise ConfigError("cft.modes: 'none' is the pre-trained generator; it has no objective")


def build_reg(config: Any, ctx: ObjectiveContext) -> GuidedObjective:
    """Reg-CFT: the regressor's NLL of every variable."""
    return GuidedObjective(ctx, None, torch.ones(len(ctx.info.variables), dtype=torch.bool))


def build_seg(config: Any, ctx: ObjectiveContext) -> GuidedObjective:
    """Seg-CFT: whole-structure soft areas (+ the regressor on subject-level variables)."""
    return GuidedObjective(ctx, area_terms(ctx.info, regional=False), _subject_variables(ctx))


def build_pos_seg(config: Any, ctx: ObjectiveContext) -> GuidedObjective:
    """Pos-Seg-CFT: soft areas per region (+ the regressor on subject-level variables)."""
    return GuidedObjective(ctx, area_terms(ctx.info, regional=True), _subject_variables(ctx))
