"""How well a segmentor has learned each structure variable: Dice of its argmax and soft-area
absolute percentage error against the masks of a split (docs/method.md, section 6.6). The
segmentor quality gate of ``segcft train`` and the report's floor marks read these numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from segcft.data.variables import DatasetInfo
from segcft.evaluation.measure import Measurer
from segcft.metrics import abs_errors, dice_scores

__all__ = ["QUALITY_SAMPLES", "not_learned", "segmentor_quality"]

QUALITY_SAMPLES = 256
"""Samples of the split measured at most (the first ones): enough for a per-structure mean."""

_BATCH = 16


@torch.inference_mode()
def segmentor_quality(
    seg: Any, dataset: Any, info: DatasetInfo, device: torch.device, limit: int = QUALITY_SAMPLES
) -> dict[str, dict[str, float]]:
    """``{variable: {"dice", "mape"}}`` per structure variable over the first ``limit`` samples
    of ``dataset``: the mean per-image Dice of the segmentor's argmax within the variable's
    class (and region), and the mean soft-area APE % against the mask's area. Means skip images
    where the value is undefined (Dice: structure absent from both; APE: empty mask); NaN when
    no image defines it."""
    meas = Measurer(info)
    count = min(len(dataset), int(limit))
    dices: dict[str, list[torch.Tensor]] = {v.name: [] for v in info.structure_variables}
    apes: dict[str, list[torch.Tensor]] = {v.name: [] for v in info.structure_variables}
    was_training = seg.training
    seg.eval()
    for start in range(0, count, _BATCH):
        items = [dataset[i] for i in range(start, min(count, start + _BATCH))]
        x = torch.stack([torch.as_tensor(it["image"]) for it in items]).float().to(device)
        mask = torch.stack([torch.as_tensor(it["mask"]) for it in items]).long().to(device)
        regions = (
            torch.stack([torch.as_tensor(it["regions"]) for it in items]).long().to(device)
            if items[0].get("regions") is not None
            else None
        )
        logits = seg(x).float()
        areas = meas(logits, regions)
        labels = logits.argmax(dim=1)
        for var in info.structure_variables:
            true = meas.structure_mask(var, mask, regions)
            pred = meas.structure_mask(var, labels, regions)
            dices[var.name].append(dice_scores(pred, true).cpu())
            truth = true.reshape(true.shape[0], -1).sum(1).double() * info.voxel_size
            _, ape = abs_errors(areas[:, info.index(var.name)], truth, info.voxel_size / 2)
            apes[var.name].append(ape.cpu())
    seg.train(was_training)
    return {name: {"dice": _nanmean(dices[name]), "mape": _nanmean(apes[name])} for name in dices}


def not_learned(quality: dict[str, dict[str, float]], min_dice: float, max_mape: float) -> list[str]:
    """The structure variables whose Dice is under ``min_dice`` or whose MAPE is over
    ``max_mape`` (a threshold of 0 checks nothing; an undefined value fails an active check)."""
    bad = []
    for name, q in quality.items():
        low = min_dice > 0 and not q["dice"] >= min_dice
        high = max_mape > 0 and not q["mape"] <= max_mape
        if low or high:
            bad.append(name)
    return bad


def _nanmean(chunks: list[torch.Tensor]) -> float:
    v = torch.cat(chunks).numpy() if chunks else np.zeros(0)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan
