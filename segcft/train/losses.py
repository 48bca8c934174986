"""The loss of each trained stage as an nn.Module that maps a batch to ``{"loss", ...logs}``
(DDP wraps it, so the trained weights are its parameters)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segcft.dscm import DSCM
from segcft.models.segmentation import segmentation_loss
from segcft.objectives.base import CFTObjective

__all__ = ["CFTLoss", "GeneratorLoss", "MechanismsLoss", "RegressorLoss", "SegmentorLoss"]


class MechanismsLoss(nn.Module):
    """Mean negative log-likelihood of the parent SCM on a minibatch of normalised parents;
    ``last`` keeps the latest value (the final checkpoint's ``nll``)."""

    def __init__(self, scm: nn.Module) -> None:
        super().__init__()
        self.scm: Any = scm  # a ParentSCM
        self.last = float("nan")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        nll = self.scm.nll(batch["parents"])
        self.last = float(nll.detach())
        return {"nll": self.last, "loss": nll}


def intensity_augment(x: torch.Tensor, shift: float, scale: float, rng: torch.Generator) -> torch.Tensor:
    """``x`` with each image's global intensity scaled and shifted at random
    (``IntensityAugmentConfig``). The draws cover the whole global batch and each rank takes
    its share as the sampler interleaves it, so the same images get the same changes with any
    number of ranks."""
    ddp = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
    u = torch.rand((2, x.shape[0] * world), device=x.device, generator=rng)[:, rank::world]
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    a = (1.0 + scale * (2.0 * u[0] - 1.0)).view(shape)
    b = (shift * (2.0 * u[1] - 1.0)).view(shape)
    return (a * (x + 1.0) - 1.0 + b).clamp(-1.0, 1.0)


class SegmentorLoss(nn.Module):
    """The segmentor's own ``loss`` (else Dice + cross-entropy) of its logits against the label
    mask, on images whose global intensity is randomly scaled and shifted (``IntensityAugmentConfig``)."""

    def __init__(self, seg: nn.Module, intensity: Any, rng: torch.Generator) -> None:
        super().__init__()
        self.seg = seg
        self.rng = rng
        self.shift, self.scale = float(intensity.shift), float(intensity.scale)  # checked with the config

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = batch["image"]
        if self.shift > 0 or self.scale > 0:
            x = intensity_augment(x, self.shift, self.scale, self.rng)
        loss_fn = getattr(self.seg, "loss", None)  # a segmentor's own training loss, else Dice + CE
        logits = self.seg(x)
        return {
            "loss": loss_fn(logits, batch["mask"]) if callable(loss_fn) else segmentation_loss(logits, batch["mask"])
        }


class RegressorLoss(nn.Module):
    """Summed per-variable training loss of the normalised parents: the regressor's own ``loss``
    when it has one (the built-in cnn's beta-NLL), else its negative log-likelihood. With an
    intensity augmentation, the structure variables' columns are taken from a second pass over
    the augmented image (``structures``: (P,) bool), so their heads cannot read an area from global
    brightness, while the other variables keep the brightness the data give them."""

    def __init__(
        self,
        reg: nn.Module,
        intensity: Any = None,
        structures: torch.Tensor | None = None,
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.reg: Any = reg  # a Regressor (segcft.protocols)
        self.shift = float(intensity.shift) if intensity is not None else 0.0
        self.scale = float(intensity.scale) if intensity is not None else 0.0
        self.structures, self.rng = structures, rng

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        per_variable = getattr(self.reg, "loss", None) or self.reg.nll
        x, parents = batch["image"], batch["parents"]
        loss = per_variable(x, parents).float()
        if (self.shift > 0 or self.scale > 0) and self.structures is not None and self.rng is not None:
            aug = per_variable(intensity_augment(x, self.shift, self.scale, self.rng), parents).float()
            loss = torch.where(self.structures.to(loss.device), aug, loss)
        return {"loss": loss.sum(1).mean()}


class GeneratorLoss(nn.Module):
    """The per-pixel negative ELBO."""

    def __init__(self, gen: nn.Module) -> None:
        super().__init__()
        self.gen: Any = gen  # a Generator (segcft.protocols)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = self.gen.elbo(batch["image"], batch["parents"])
        return {"loss": out["loss"], "nll": float(out["nll"].detach()), "kl": float(out["kl"].detach())}


class CFTLoss(nn.Module):
    """The fine-tuning Lagrangian as a module (DDP wraps it: generator weights and lambda are
    its parameters; mechanisms are frozen and the guides are not registered)."""

    def __init__(self, dscm: DSCM, objective: CFTObjective, rng: torch.Generator) -> None:
        super().__init__()
        self.dscm, self.objective = dscm, objective
        self.rng = rng

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = self.objective(self.dscm, batch, self.rng)
        out.pop("variable")
        return out
