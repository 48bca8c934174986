"""A guide made of several segmentors: their class probabilities averaged.

Fine-tuning against one frozen segmentor can meet its area targets with patterns that only that
network reads as structure (an adversarial edit): on cxr-phantom Seg-CFT's counterfactuals score
better by the guide than the exact counterfactuals do, and worse by the evaluation segmentor.
Members trained from other seeds err in different places, so an edit has to look like structure
to all of them at once to move their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SegmentorEnsemble"]


class SegmentorEnsemble(nn.Module):
    """Segmentor protocol over ``members``: ``forward(x)`` gives log of the members' mean softmax
    probabilities, so ``softmax(forward(x))`` is that mean and every soft area (a sum of
    probabilities) is the mean of the members' soft areas. Each member applies its own eval-mode
    settings (e.g. the unet's ``measure_temperature``) before the mean."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 segmentors, got {len(members)}")
        first = members[0]
        classes = tuple(getattr(first, "classes", ()))
        dims = int(getattr(first, "spatial_dims", 0))
        for i, m in enumerate(members[1:], start=2):
            if tuple(getattr(m, "classes", ())) != classes or int(getattr(m, "spatial_dims", 0)) != dims:
                raise ValueError(f"ensemble member {i} has other classes or dimensions than member 1")
        self.members = nn.ModuleList(members)
        self.classes = classes
        self.spatial_dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 1, *S) -> (B, C, *S) log mean probabilities (float32)."""
        log_probs = [torch.log_softmax(m(x).float(), dim=1) for m in self.members]
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
