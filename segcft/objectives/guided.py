"""The built-in objectives: guidance by the frozen segmentor's soft areas (seg, pos-seg) and by
the frozen regressor's predicted means (reg; also the subject-level variables of seg and pos-seg when
the run has a regressor). Their settings are the ``cft`` section's penalty, huber_delta,
soft_labels, seg_weight and reg_weight."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segcft.dscm import affected_mask
from segcft.errors import ConfigError
from segcft.objectives.area import AreaTerms, area_terms
from segcft.objectives.base import CFTObjective, ObjectiveContext
from segcft.objectives.configs import SegSettings
from segcft.objectives.jitter import random_offsets, shift
from segcft.objectives.locality import allowed_region, interior_region, locality_penalty, weighted_mean_abs

__all__ = ["PENALTIES", "GuidedObjective", "build_pos_seg", "build_reg", "build_seg", "pretrained"]

PENALTIES: tuple[str, ...] = ("l1", "l2", "huber")


class GuidedObjective(CFTObjective):
    """L_guide = seg_weight * area loss of ``terms`` (if any) + reg_weight * regressor error of
    the variables ``reg_vars`` (if any), both in normalised units under the same penalty."""

    terms: AreaTerms | None
    reg_vars: torch.Tensor

    def __init__(
        self,
        ctx: ObjectiveContext,
        terms: AreaTerms | None,
        reg_vars: torch.Tensor,
        settings: SegSettings | None = None,
    ) -> None:
        if ctx.cft.penalty not in PENALTIES:
            raise ConfigError(f"cft.penalty: unknown penalty {ctx.cft.penalty!r}; expected one of {list(PENALTIES)}")
        settings = settings or SegSettings()
        checked = ("locality", "locality_radius", "locality_interior", "guide_shift", "guide_noise")
        negative = {name: getattr(settings, name) for name in checked if getattr(settings, name) < 0}
        if negative:
            raise ConfigError(
                f"cft.objectives.{ctx.mode}: {', '.join(checked)} must be >= 0, got "
                + ", ".join(f"{name}={value}" for name, value in negative.items())
            )
        super().__init__(ctx)
        self.terms = terms
        self.locality = float(settings.locality) if terms is not None else 0.0
        self.locality_radius = int(settings.locality_radius)
        self.locality_band = bool(settings.locality_band)
        self.locality_interior = float(settings.locality_interior) if terms is not None else 0.0
        self.guide_shift = int(settings.guide_shift)
        self.guide_noise = float(settings.guide_noise)
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
        measured: dict[str, torch.Tensor] = {}
        if self.terms is not None:
            seg, logits = self._seg_loss(x_cf, pa_cf, batch, changed, measured)
            total = total + self.cfg.seg_weight * seg
            logs["seg"] = float(seg.detach())
            if self.locality > 0 or self.locality_interior > 0:
                local, interior = self._locality(x_cf, batch["image"], logits, intervened, changed, measured)
                if self.locality > 0:
                    total = total + self.locality * local
                    logs["locality"] = float(local.detach())
                if self.locality_interior > 0:
                    total = total + self.locality_interior * interior
                    logs["locality_interior"] = float(interior.detach())
        if bool(self.reg_vars.any()):
            reg = self._reg_loss(x_cf, pa_cf, batch, changed)
            total = total + self.cfg.reg_weight * reg
            logs["reg"] = float(reg.detach())
        return total, logs

    def _on_factual(self, x: torch.Tensor, measured: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guide's logits on the factual batch, without gradient, measured at most once a step
        (``measured`` holds them) and shared by the soft area targets and the locality masks."""
        if "x" not in measured:
            assert self.segmentor is not None
            with torch.no_grad():
                measured["x"] = self.segmentor(x)
        return measured["x"]

    def _locality(
        self,
        x_cf: torch.Tensor,
        x: torch.Tensor,
        logits_cf: torch.Tensor,
        intervened: str,
        changed: torch.Tensor,
        measured: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The locality penalties when a structure variable is intervened on: mean |x_cf - x|
        outside the dilated guide masks of the structures whose terms change, on x and on x_cf
        (with ``locality_band``, also inside the interior both share), and mean |x_cf - x| over
        that shared interior alone (computed only when ``locality_interior`` is on). Zero for
        other interventions (a subject-level variable may change the whole image)."""
        terms = self.terms
        assert terms is not None
        zero = x_cf.new_zeros((), dtype=torch.float32)
        if not self.info.variable(intervened).is_structure:
            return zero, zero
        classes = sorted({int(c) for c in terms.index[terms.affected(changed.cpu()), 0].tolist()})
        probs_x = torch.softmax(self._on_factual(x, measured).float(), dim=1)
        probs_cf = torch.softmax(logits_cf.detach().float(), dim=1)
        local = zero
        if self.locality > 0:
            allowed = allowed_region(probs_x, probs_cf, classes, self.locality_radius, self.locality_band)
            local = locality_penalty(x_cf, x, allowed)
        interior = zero
        if self.locality_interior > 0:
            interior = weighted_mean_abs(x_cf, x, interior_region(probs_x, probs_cf, classes, self.locality_radius))
        return local, interior

    def _seg_loss(
        self,
        x_cf: torch.Tensor,
        pa_cf: torch.Tensor,
        batch: dict[str, torch.Tensor],
        changed: torch.Tensor,
        measured: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The area loss and the guide's logits on x_cf (detached, in x_cf's frame). With
        ``guide_shift`` or ``guide_noise`` the guide measures a randomly translated or noisy copy of
        x_cf (the region map moved with it): an edit has to hold its area wherever the guide's
        pooling grid falls and under small perturbations, so the generator cannot meet the target
        with patterns that only this guide reads as structure."""
        from segcft.ops import area_loss, soft_area

        terms, segmentor = self.terms, self.segmentor
        assert terms is not None and segmentor is not None
        regions = batch.get("regions") if terms.regional else None
        num_regions = self.info.num_regions if terms.regional else 0
        device = x_cf.device
        index, scale = terms.index.to(device), terms.scale.to(device)
        targets = terms.targets(self.info, pa_cf).to(device)
        if self.cfg.soft_labels is True:  # "regressor" leaves the area terms' targets at pa*
            with torch.no_grad():
                areas = soft_area(
                    self._on_factual(batch["image"], measured),
                    spacing=tuple(self.info.spacing),
                    regions=regions,
                    num_regions=num_regions,
                )
            keep = ~terms.affected(changed)
            targets = torch.where(keep.unsqueeze(0), terms.measure(areas).float(), targets)
        weights = torch.ones_like(targets)
        seen, offsets = x_cf, None
        if self.guide_shift > 0:
            offsets = random_offsets(x_cf.shape[0], x_cf.dim() - 2, self.guide_shift)
            seen = shift(x_cf, offsets, self.guide_shift)
            if regions is not None:
                regions = shift(regions, offsets, self.guide_shift)
        if self.guide_noise > 0:
            seen = seen + self.guide_noise * torch.randn(seen.shape, dtype=seen.dtype).to(seen.device)
        logits = segmentor(seen)
        loss = area_loss(
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
        logits = logits.detach()
        return loss, logits if offsets is None else shift(logits, -offsets, self.guide_shift)

    def _reg_loss(
        self, x_cf: torch.Tensor, pa_cf: torch.Tensor, batch: dict[str, torch.Tensor], changed: torch.Tensor
    ) -> torch.Tensor:
        """The regressor's error on the same footing as the area terms: ``penalty`` of the
        predicted mean's error in normalised units for continuous variables (not a likelihood,
        whose 1/scale^2 would weight each variable by how sure the regressor is), Bernoulli
        cross-entropy for binary ones; summed over the variables, mean over the batch. Each
        variable is predicted given its counterfactual parents."""
        from segcft.ops.reference import rho

        regressor = self.regressor
        assert regressor is not None
        targets = pa_cf.float()
        binary = torch.tensor([v.type == "binary" for v in self.info.variables], device=targets.device)
        if self.cfg.soft_labels:  # True or "regressor"
            with torch.no_grad():
                pred = regressor(batch["image"], batch["parents"])["loc"].float()
            soft = torch.where(binary, torch.sigmoid(pred), pred)
            targets = torch.where(changed.unsqueeze(0), targets, soft)
        loc = regressor(x_cf, pa_cf)["loc"].float()
        cont = rho(loc - targets, self.cfg.penalty, self.cfg.huber_delta)
        bern = F.binary_cross_entropy_with_logits(loc, targets.clamp(0, 1), reduction="none")
        per = torch.where(binary, bern, cont)
        return per[:, self.reg_vars.to(per.device)].sum(1).mean()


def _subject_variables(ctx: ObjectiveContext) -> torch.Tensor:
    """(P,) bool: the variables that are not structure areas, when the run has a regressor."""
    mask = torch.tensor([not v.is_structure for v in ctx.info.variables], dtype=torch.bool)
    return mask if ctx.regressor is not None else torch.zeros_like(mask)


def pretrained(config: Any, ctx: ObjectiveContext) -> CFTObjective:
    """Mode none: the pre-trained generator itself, evaluated as is (no fine-tuning stage)."""
    raise ConfigError("cft.modes: 'none' is the pre-trained generator; it has no objective")


def build_reg(config: Any, ctx: ObjectiveContext) -> GuidedObjective:
    """Reg-CFT: the regressor's error on every variable."""
    return GuidedObjective(ctx, None, torch.ones(len(ctx.info.variables), dtype=torch.bool))


def build_seg(config: SegSettings, ctx: ObjectiveContext) -> GuidedObjective:
    """Seg-CFT: whole-structure soft areas (+ the regressor on subject-level variables, + the
    optional locality penalty)."""
    return GuidedObjective(ctx, area_terms(ctx.info, regional=False), _subject_variables(ctx), config)


def build_pos_seg(config: SegSettings, ctx: ObjectiveContext) -> GuidedObjective:
    """Pos-Seg-CFT: soft areas per region (+ the regressor on subject-level variables, + the
    optional locality penalty)."""
    return GuidedObjective(ctx, area_terms(ctx.info, regional=True), _subject_variables(ctx), config)
