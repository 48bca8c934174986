"""Pure-torch soft area and area loss with the same semantics as the kernel ops.

Used as the fallback where the compiled kernels are missing, and as the ground truth in tests.
`soft_area` and `area_loss` differentiate through torch autograd; `raw_sums` and
`raw_backward` mirror the two kernels (raw sums, and the closed-form gradient of docs/method.md section 4.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segcft.ops import _validate as v

__all__ = ["area_loss", "raw_backward", "raw_sums", "rho", "soft_area", "variable_areas"]


def _probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    x = logits.to(v.accumulate_dtype(logits.dtype))
    return torch.softmax(x, dim=1) if activation == "softmax" else torch.sigmoid(x)


def _region_sums(p: torch.Tensor, regions: torch.Tensor | None, num_regions: int) -> torch.Tensor:
    b, c = p.shape[:2]
    flat = p.reshape(b, c, -1)
    if regions is None:
        return flat.sum(-1, keepdim=True)
    ids = regions.reshape(b, 1, -1).expand(b, c, flat.shape[-1])
    return flat.new_zeros(b, c, num_regions).scatter_add(2, ids, flat)


def raw_sums(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> torch.Tensor:
    """Sums of probabilities (B, C, max(R, 1)) in float32 (float64 for float64 logits)."""
    return _region_sums(_probabilities(logits, activation), regions, num_regions)


def raw_backward(
    logits: torch.Tensor,
    regions: torch.Tensor | None,
    num_regions: int,
    activation: str,
    grad: torch.Tensor,
) -> torch.Tensor:
    """dL/dlogits (contiguous, logits dtype) from grad = dL/d(raw sums) (B, C, max(R, 1))."""
    p = _probabilities(logits, activation)
    b, c = p.shape[:2]
    g = grad.to(p.dtype)
    if regions is None:
        gs = g.reshape(b, c, *([1] * (p.dim() - 2)))
    else:
        ids = regions.reshape(b, 1, -1).expand(b, c, -1)
        gs = torch.gather(g, 2, ids).reshape(p.shape)
    if activation == "softmax":
        out = p * (gs - (p * gs).sum(1, keepdim=True))
    else:
        out = gs * p * (1 - p)
    return out.to(logits.dtype).contiguous()


def soft_area(
    logits: torch.Tensor,
    spacing: float | Sequence[float] = 1.0,
    activation: str = "softmax",
    regions: torch.Tensor | None = None,
    num_regions: int = 0,
) -> torch.Tensor:
    """Soft areas (B, C), or (B, C, R) with a region map, in physical units (see segcft.ops)."""
    nd = v.check_logits(logits)
    v.check_activation(activation)
    vol = v.voxel_volume(spacing, nd)
    regions = v.check_regions(logits, regions, num_regions)
    v.check_region_values(regions, num_regions)
    areas = raw_sums(logits, regions, num_regions, activation) * vol
    return areas if regions is not None else areas[..., 0]


def rho(u: torch.Tensor, name: str, huber_delta: float = 1.0) -> torch.Tensor:
    """rho(u) elementwise: |u| (l1), u^2 (l2) or the Huber function with threshold huber_delta."""
    if name == "l1":
        return u.abs()
    if name == "l2":
        return u * u
    return F.huber_loss(u, torch.zeros_like(u), reduction="none", delta=huber_delta)


def variable_areas(areas: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Picks the K variables (B, K) from areas (B, C, R'): rows of index are (class, region),
    region -1 meaning the sum over all regions."""
    cls = index[:, 0].long()
    reg = index[:, 1].long()
    whole = areas.sum(2)[:, cls]
    regional = areas[:, cls, reg.clamp(min=0)]
    return torch.where(reg < 0, whole, regional)


def area_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    scale: torch.Tensor,
    penalty: str = "l1",
    spacing: float | Sequence[float] = 1.0,
    activation: str = "softmax",
    regions: torch.Tensor | None = None,
    num_regions: int = 0,
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Mean over the batch of sum_k weights[b, k] rho((A[b, k] - targets[b, k]) / scale[k])."""
    nd = v.check_logits(logits)
    v.check_activation(activation)
    v.check_penalty(penalty, huber_delta)
    vol = v.voxel_volume(spacing, nd)
    regions = v.check_regions(logits, regions, num_regions)
    v.check_loss_inputs(logits, targets, weights, index, scale)
    v.check_region_values(regions, num_regions)
    v.check_loss_values(index, scale, logits.shape[1], num_regions)
    acc = v.accumulate_dtype(logits.dtype)
    areas = raw_sums(logits, regions, num_regions, activation) * vol
    a = variable_areas(areas, index)
    u = (a - targets.to(acc)) / scale.to(acc)
    per_item = (weights.to(acc) * rho(u, penalty, huber_delta)).sum(1)
    return per_item.sum() / max(logits.shape[0], 1)
