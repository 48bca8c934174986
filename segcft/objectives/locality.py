"""The locality penalty of the segmentor-guided objectives (docs/method.md section 5.4): the mean
|x_cf - x| outside the region a structure intervention may change, read from the frozen guide."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["allowed_region", "locality_penalty"]


@torch.no_grad()
def allowed_region(probs_x: torch.Tensor, probs_cf: torch.Tensor, classes: list[int], radius: int) -> torch.Tensor:
    """(B, 1, *S) soft mask of where the image may change: the union (max) of the guide's
    probabilities of ``classes`` on x and on x_cf, dilated by a max-pool of ``radius``. No
    gradient: the masks only say where to measure, the guide is not trained through them."""
    union = torch.cat([probs_x[:, classes], probs_cf[:, classes]], dim=1).amax(1, keepdim=True).float()
    if radius <= 0:
        return union
    pool = F.max_pool2d if union.dim() == 4 else F.max_pool3d
    return pool(union, kernel_size=2 * radius + 1, stride=1, padding=radius)


def locality_penalty(x_cf: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each image's mean |x_cf - x| weighted by 1 - ``allowed`` (a float32
    scalar; zero when x_cf differs from x only where ``allowed`` is 1)."""
    outside = (1.0 - allowed.detach()).clamp(0.0, 1.0)
    diff = (x_cf.float() - x.float()).abs()
    dims = tuple(range(1, diff.dim()))
    per = (diff * outside).sum(dims) / outside.sum(dims).clamp(min=1.0)
    return per.mean()
