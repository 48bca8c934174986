"""The locality penalty of the segmentor-guided objectives (docs/method.md section 5.4): the mean
|x_cf - x| outside the region a structure intervention may change, read from the frozen guide."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["allowed_region", "locality_penalty"]


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
    m_x = probs_x[:, classes].amax(1, keepdim=True).float()
    m_cf = probs_cf[:, classes].amax(1, keepdim=True).float()
    union = torch.maximum(m_x, m_cf)
    if radius > 0:
        pool = F.max_pool2d if union.dim() == 4 else F.max_pool3d
        grow = lambda t: pool(t, kernel_size=2 * radius + 1, stride=1, padding=radius)  # noqa: E731
    else:
        grow = lambda t: t  # noqa: E731
    if not band:
        return grow(union)
    return torch.minimum(grow(union), grow(1.0 - torch.minimum(m_x, m_cf)))


def locality_penalty(x_cf: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's mean |x_cf - x| weighted by 1 - ``allowed`` (a float32
    scalar; zero when x_cf differs from x only where ``allowed`` is 1)."""
    outside = (1.0 - allowed.detach()).clamp(0.0, 1.0)
    diff = (x_cf.float() - x.float()).abs()
    dims = tuple(range(1, diff.dim()))
    per = (diff * outside).sum(dims) / outside.sum(dims).clamp(min=1.0)
    return per.mean()
