"""Losses and metrics of segmentation that work on any segmentor's logits (B, C, *S), 2D or 3D:
Dice + cross-entropy for training (MONAI's DiceCELoss, imported when first used; optionally with
class weights and a focal exponent on the cross-entropy) and the per-structure Dice of the argmax
prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from segcft.errors import DatasetError

_LOSS: dict[str, Any] = {}


def segmentation_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Dice + cross-entropy (``monai.losses.DiceCELoss``, softmax, one-hot labels), a scalar.

    ``logits`` (B, C, *S), ``mask`` (B, *S) integer labels in [0, C). With ``class_weights``
    (C,) or ``focal_gamma`` > 0 the cross-entropy term is the class-weighted focal one,
    sum_v w_y (1 - p_y)^gamma (-log p_y) / sum_v w_y: uniform weights and gamma 0 give the plain
    loss, larger weights make rare classes (a few hundred plaque voxels) count."""
    if mask.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)} (expected (B, *S))")
    if class_weights is not None and len(class_weights) != logits.shape[1]:
        raise ValueError(f"class_weights has {len(class_weights)} values, expected one per class ({logits.shape[1]})")
    if class_weights is None and focal_gamma == 0.0:
        return _dice_ce(logits, mask)
    if "dice" not in _LOSS:
        from monai.losses import DiceLoss

        _LOSS["dice"] = DiceLoss(to_onehot_y=True, softmax=True)
    _check_labels(logits, mask)
    logits, labels = logits.float(), mask.long()
    logp = torch.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    w = torch.ones_like(logp) if class_weights is None else logits.new_tensor(list(class_weights))[labels]
    # 1 - p_y floored so that gamma < 1 keeps a finite gradient where p_y reaches 1
    focal = (-torch.expm1(logp)).clamp_min(1e-6).pow(focal_gamma) if focal_gamma > 0 else torch.ones_like(logp)
    ce = (w * focal * -logp).sum() / w.sum()
    return _LOSS["dice"](logits, labels.unsqueeze(1)) + ce


def _dice_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MONAI's unweighted DiceCELoss."""
    if "dice_ce" not in _LOSS:
        from monai.losses import DiceCELoss

        _LOSS["dice_ce"] = DiceCELoss(to_onehot_y=True, softmax=True)
    _check_labels(logits, mask)
    return _LOSS["dice_ce"](logits.float(), mask.unsqueeze(1).long())


def _check_labels(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """A DatasetError when the mask holds values that are not class indices."""
    low, high = (int(v) for v in torch.aminmax(mask))
    if low < 0 or high >= logits.shape[1]:
        raise DatasetError(
            f"a batch's mask holds values {low}..{high}, expected class indices 0..{logits.shape[1] - 1} "
            "(0 background, then the dataset's structures in order; a dataset returns class indices, not raw labels)"
        )


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
