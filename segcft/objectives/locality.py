"""The locality penalty of the segmentor-guided objectives (docs/method.md section 5.4): the mean
|x_cf - x| outside the region a structure intervention may change, read from the frozen guide."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["allowed_region", "interior_region", "locality_penalty", "weighted_mean_abs"]


def _grow(t: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilation of a soft mask by a max-pool of ``radius`` pixels (voxels) per side."""
    if radius <= 0:
        return t
    pool = F.max_pool2d if t.dim() == 4 else F.max_pool3d
    return pool(t, kernel_size=2 * radius + 1, stride=1, padding=radius)


def _memberships(
    probs_x: torch.Tensor, probs_cf: torch.Tensor, classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, *S) membership of the structures ``classes`` on x and on x_cf: the max of their
    probabilities."""
    return probs_x[:, classes].amax(1, keepdim=True).float(), probs_cf[:, classes].amax(1, keepdim=True).float()


@torch.no_grad()
def allowed_region(
    probs_x: torch.Tensor, probs_cf: torch.Tensor, classes: list[int], radius: int, band: bool = False
) -> torch.Tensor:
    """(B, 1, *S) soft mask of where the image may change. The structure's membership on each
    image is the max of the guide's probabilities of ``classes``; the region is their union on x
    and x_cf, dilated by a max-pool of ``radius``. With ``band``, it is only the band where the
    membership changes: the union dilated, minus the intersection eroded by ``radius`` (a soft
    AND: the min of the dilated union and the dilated complement of the intersection), so the
    interior both images share is held to x too. No gradient: the masks only say where to
    measure, the guide is not trained through them."""
    m_x, m_cf = _memberships(probs_x, probs_cf, classes)
    union = _grow(torch.maximum(m_x, m_cf), radius)
    if not band:
        return union
    return torch.minimum(union, _grow(1.0 - torch.minimum(m_x, m_cf), radius))


@torch.no_grad()
def interior_region(probs_x: torch.Tensor, probs_cf: torch.Tensor, classes: list[int], radius: int) -> torch.Tensor:
    """(B, 1, *S) soft mask of the interior the structures share on x and x_cf: their
    intersection eroded by ``radius`` (1 minus the dilated complement), i.e. what
    ``allowed_region(..., band=True)`` holds inside the structure. No gradient."""
    m_x, m_cf = _memberships(probs_x, probs_cf, classes)
    return 1.0 - _grow(1.0 - torch.minimum(m_x, m_cf), radius)


def weighted_mean_abs(x_cf: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's mean |x_cf - x| weighted by the soft mask ``weight``
    (clamped to [0, 1], no gradient), normalised by the image's mask mass (at least 1): a float32
    scalar, zero when x_cf differs from x only where the mask is 0. The training-loss twin of
    ``segcft.metrics.masked_mean_abs``, which scores boolean masks per sample in float64."""
    w = weight.detach().clamp(0.0, 1.0)
    diff = (x_cf.float() - x.float()).abs()
    dims = tuple(range(1, diff.dim()))
    per = (diff * w).sum(dims) / w.sum(dims).clamp(min=1.0)
    return per.mean()


def locality_penalty(x_cf: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's mean |x_cf - x| weighted by 1 - ``allowed`` (a float32
    scalar; zero when x_cf differs from x only where ``allowed`` is 1)."""
    return weighted_mean_abs(x_cf, x, 1.0 - allowed.detach())
