"""Pure metric functions of docs/method.md section 6, independent of any model or run.

Every function takes tensors (or arrays) and returns per-sample values, so the evaluation can
pool them over batches and bootstrap them over subjects. Images are in [-1, 1]; differences are
reported on the 0-255 scale (``to_255``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PIXEL_SCALE",
    "abs_errors",
    "bootstrap_mean",
    "bootstrap_ratio",
    "dice_scores",
    "dilate",
    "locality",
    "masked_mean_abs",
    "permutation",
    "to_255",
]

PIXEL_SCALE = 127.5
"""A difference of 2 in [-1, 1] is a difference of 255 on the 8-bit scale."""


_Values = TypeVar("_Values", torch.Tensor, np.ndarray, float)


def to_255(values: _Values) -> _Values:
    """Convert absolute differences of [-1, 1] images to the 0-255 scale."""
    return values * PIXEL_SCALE


def permutation(n: int, seed: int) -> torch.Tensor:
    """A fixed permutation of ``range(n)`` from ``seed`` (CPU generator: device independent)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def abs_errors(
    measured: torch.Tensor, target: torch.Tensor, min_target: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample absolute error ``|A - a|`` and absolute percentage error ``100 |A - a| / |a|``.

    The percentage is NaN where ``|a| <= min_target`` (a percentage of an empty structure is
    undefined); callers drop NaNs when averaging."""
    measured = measured.double()
    target = target.double()
    err = (measured - target).abs()
    denom = target.abs()
    pct = torch.where(denom > min_target, 100.0 * err / denom.clamp_min(1e-300), torch.full_like(err, math.nan))
    return err, pct


def dice_scores(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice ``2 |P & T| / (|P| + |T|)`` of two (B, *S) boolean masks; NaN where both
    are empty (nothing to find, nothing to score)."""
    p, t = pred.reshape(pred.shape[0], -1).bool(), true.reshape(true.shape[0], -1).bool()
    inter = (p & t).sum(1).double()
    total = (p.sum(1) + t.sum(1)).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.full_like(total, math.nan))


def dilate(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """Binary dilation of (B, *S) masks (2D or 3D) by a cube of side ``2 * iterations + 1``
    (max pooling, stride 1); ``iterations = 0`` returns the mask unchanged (as bool)."""
    mask = mask.bool()
    if iterations <= 0:
        return mask
    dims = mask.dim() - 1
    if dims not in (2, 3):
        raise ValueError(f"dilate expects (B, H, W) or (B, D, H, W) masks, got shape {tuple(mask.shape)}")
    pool = F.max_pool2d if dims == 2 else F.max_pool3d
    k = 2 * int(iterations) + 1
    out = pool(mask.unsqueeze(1).float(), kernel_size=k, stride=1, padding=int(iterations))
    return out.squeeze(1) > 0.5


def masked_mean_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of ``|a - b|`` over the voxels where ``mask`` is true (all when None).

    ``a``, ``b``: (B, 1, *S) or (B, *S); ``mask``: (B, *S). NaN for a sample with an empty mask."""
    diff = (a.double() - b.double()).abs()
    if diff.dim() >= 3 and diff.shape[1] == 1 and (mask is None or diff.dim() == mask.dim() + 1):
        diff = diff.squeeze(1)
    flat = diff.reshape(diff.shape[0], -1)
    if mask is None:
        return flat.mean(dim=1)
    m = mask.reshape(mask.shape[0], -1).to(flat.dtype)
    count = m.sum(dim=1)
    total = (flat * m).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, math.nan))


def locality(x: torch.Tensor, x_cf: torch.Tensor, structure: torch.Tensor, dilation: int) -> dict[str, torch.Tensor]:
    """Mean ``|x_cf - x|`` outside and inside the dilated structure mask (B, *S), per sample.

    ``structure`` is the union of the factual and counterfactual masks of the intervened
    structure; ``outside`` is NaN where the dilated mask covers the image, ``inside`` where the
    mask is empty."""
    region = dilate(structure, dilation)
    return {
        "outside": masked_mean_abs(x_cf, x, ~region),
        "inside": masked_mean_abs(x_cf, x, region),
    }


@functools.lru_cache(maxsize=8)
def _resample_index(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) subject indices drawn with replacement; cached (read-only) because an
    evaluation bootstraps hundreds of metrics over the same subjects with the same seed."""
    rng = np.random.default_rng(int(seed))
    idx = rng.integers(0, n, size=(int(resamples), n))
    idx.setflags(write=False)
    return idx


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray | torch.Tensor, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of the finite values and its percentile bootstrap interval over subjects.

    NaN entries (undefined for that subject) are dropped first; ``n`` is the number kept.
    With fewer than two values the interval collapses to the mean."""
    v = _as_array(values)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(v.mean())
    if n < 2 or resamples <= 0:
        return {"mean": mean, "lo": mean, "hi": mean, "n": n}
    stats = v[_resample_index(n, resamples, seed)].mean(axis=1)
    lo, hi = _interval(stats, level)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def bootstrap_ratio(
    num: Sequence[float] | np.ndarray | torch.Tensor,
    den: Sequence[float] | np.ndarray | torch.Tensor,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Ratio of means ``mean(num) / mean(den)`` over subjects where both are finite, with a
    paired bootstrap interval (the same resampled subjects for numerator and denominator)."""
    a, b = _as_array(num), _as_array(den)
    if a.shape != b.shape:
        raise ValueError(f"bootstrap_ratio: shapes {a.shape} and {b.shape} differ")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n == 0 or b.mean() == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    ratio = float(a.mean() / b.mean())
    if n < 2 or resamples <= 0:
        return {"mean": ratio, "lo": ratio, "hi": ratio, "n": n}
    idx = _resample_index(n, resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    lo, hi = _interval(stats, level)
    return {"mean": ratio, "lo": lo, "hi": hi, "n": n}


def _as_array(values: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
