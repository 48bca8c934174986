"""Losses and metrics of segmentation that work on any segmentor's logits (B, C, *S), 2D or 3D:
Dice + cross-entropy for training (MONAI's DiceCELoss, imported when first used) and the
per-structure Dice of the argmax prediction."""

from __future__ import annotations

from typing import Any

import torch

from segcft.errors import DatasetError

_LOSS: dict[str, Any] = {}


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy (``monai.losses.DiceCELoss``, softmax, one-hot labels), a scalar.

    ``logits`` (B, C, *S), ``mask`` (B, *S) integer labels in [0, C)."""
    if "dice_ce" not in _LOSS:
        from monai.losses import DiceCELoss

        _LOSS["dice_ce"] = DiceCELoss(to_onehot_y=True, softmax=True)
    if mask.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)} (expected (B, *S))")
    low, high = (int(v) for v in torch.aminmax(mask))
    if low < 0 or high >= logits.shape[1]:
        raise DatasetError(
            f"a batch's mask holds values {low}..{high}, expected class indices 0..{logits.shape[1] - 1} "
            "(0 background, then the dataset's structures in order; a dataset returns class indices, not raw labels)"
        )
    return _LOSS["dice_ce"](logits.float(), mask.unsqueeze(1).long())


@torch.no_grad()
def dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-structure Dice (C - 1,) of the argmax prediction, averaged over the batch; a sample
    where a structure is absent from both prediction and mask counts as 1."""
    if mask.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)} (expected (B, *S))")
    num_classes = logits.shape[1]
    pred = logits.argmax(1).flatten(1)
    true = mask.flatten(1).long()
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, true == c
        inter = (p & t).sum(1).float()
        total = (p.sum(1) + t.sum(1)).float()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).mean())
    return torch.stack(scores) if scores else logits.new_zeros(0)
