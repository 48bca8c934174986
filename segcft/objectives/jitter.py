"""Guide jitter of the segmentor-guided objectives (docs/method.md section 5.4): the guide measures
a randomly translated copy of the counterfactual, so that an edit only this guide reads as
structure stops paying."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_offsets", "shift"]


def random_offsets(batch: int, dims: int, largest: int) -> torch.Tensor:
    """(batch, dims) integer offsets drawn uniformly from [-largest, largest] by torch's global
    generator (seeded and saved with a stage's resume state); no draw when ``largest`` is 0."""
    if largest <= 0:
        return torch.zeros(batch, dims, dtype=torch.long)
    return torch.randint(-largest, largest + 1, (batch, dims))


def shift(t: torch.Tensor, offsets: torch.Tensor, largest: int) -> torch.Tensor:
    """``t`` (B, C, *S) or a label map (B, *S) with image b's content moved by -offsets[b] along
    each spatial axis: out[b, ..., i] = t[b, ..., i + offsets[b]], edges replicated. Label maps keep
    their dtype. ``shift(shift(t, o), -o)`` is ``t`` away from the ``largest``-wide edges."""
    if largest <= 0 or not bool(offsets.any()):
        return t
    labels = t.dim() == offsets.shape[1] + 1
    x = t.unsqueeze(1).float() if labels else t
    spatial = x.shape[2:]
    padded = F.pad(x, [largest] * (2 * len(spatial)), mode="replicate")
    crops = []
    for b in range(x.shape[0]):
        window = tuple(slice(largest + o, largest + o + n) for o, n in zip(offsets[b].tolist(), spatial, strict=True))
        index: tuple[int | slice, ...] = (b, slice(None), *window)
        crops.append(padded[index])
    out = torch.stack(crops)
    return out.squeeze(1).to(t.dtype) if labels else out
