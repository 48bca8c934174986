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
            # draws for the whole global batch, this rank's share taken as the sampler interleaves
            # it: the same images get the same changes with any number of ranks
            ddp = dist.is_available() and dist.is_initialized()
            world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
            u = torch.rand((2, x.shape[0] * world), device=x.device, generator=self.rng)[:, rank::world]
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            a = (1.0 + self.scale * (2.0 * u[0] - 1.0)).view(shape)
            b = (self.shift * (2.0 * u[1] - 1.0)).view(shape)
            x = (a * (x + 1.0) - 1.0 + b).clamp(-1.0, 1.0)
        loss_fn = getattr(self.seg, "loss", None)  # a segmentor's own training loss, else Dice + CE
        logits = self.seg(x)
        return {
            "loss": loss_fn(logits, batch["mask"]) if callable(loss_fn) else segmentation_loss(logits, batch["mask"])
        }


class RegressorLoss(nn.Module):
    """Summed per-variable training loss of the normalised parents: the regressor's own ``loss``
    when it has one (the built-in cnn's beta-NLL), else its negative log-likelihood."""

    def __init__(self, reg: nn.Module) -> None:
        super().__init__()
        self.reg: Any = reg  # a Regressor (segcft.protocols)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        per_variable = getattr(self.reg, "loss", None) or self.reg.nll
        return {"loss": per_variable(batch["image"], batch["parents"]).float().sum(1).mean()}


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
