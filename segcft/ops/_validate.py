"""Argument checks shared by the kernel ops and the pure-torch reference.

Shape, dtype and device checks read only metadata (safe under torch.compile); the value checks
(`check_region_values`, `check_index_values`) read data and run inside the op implementations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from segcft.errors import UserError

ACTIVATIONS = ("softmax", "sigmoid")
PENALTIES = ("l1", "l2", "huber")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class OpValueError(UserError, ValueError):
    """A kernel-op argument with the wrong shape, range or device."""


class OpTypeError(UserError, TypeError):
    """A kernel-op argument of the wrong type or dtype."""


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of areas and losses: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(logits: torch.Tensor) -> int:
    """Checks logits (B, C, *S) and returns the number of spatial axes."""
    if not isinstance(logits, torch.Tensor):
        raise OpTypeError(f"logits must be a torch.Tensor (B, C, *S), got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise OpTypeError(
            f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if not 3 <= logits.dim() <= 5:
        raise OpValueError(
            f"logits must have shape (B, C, *S) with 1 to 3 spatial axes, got shape {tuple(logits.shape)}"
        )
    return logits.dim() - 2


def check_activation(activation: str) -> str:
    """Checks the activation name."""
    if activation not in ACTIVATIONS:
        raise OpValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_penalty(penalty: str, huber_delta: float) -> str:
    """Checks the penalty name and the Huber threshold."""
    if penalty not in PENALTIES:
        raise OpValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
    if not isinstance(huber_delta, Real) or not huber_delta > 0:
        raise OpValueError(f"huber_delta must be a number > 0, got {huber_delta!r}")
    return penalty


def voxel_volume(spacing: float | Sequence[float], nd: int) -> float:
    """Pixel area or voxel volume: the product of the spacing (one value or one per spatial axis)."""
    if isinstance(spacing, Real) and not isinstance(spacing, bool):
        values = [float(spacing)] * nd
    elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
        values = list(spacing)
        if len(values) != nd or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise OpValueError(
                f"spacing must be a number or {nd} numbers (one per spatial axis), got {spacing!r}"
            )
    else:
        raise OpTypeError(f"spacing must be a number or a sequence of numbers, got {type(spacing).__name__}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise OpValueError(f"spacing values must be finite and > 0, got {spacing!r}")
    volume = 1.0
    for value in values:
        volume *= float(value)
    return volume


def check_regions(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int) -> torch.Tensor | None:
    """Checks a region map (B, *S) against the logits; returns it as int64 (or None)."""
    if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions < 0:
        raise OpValueError(f"num_regions must be an int >= 0, got {num_regions!r}")
    if regions is None:
        if num_regions != 0:
            raise OpValueError(f"num_regions={num_regions} needs a region map (regions=None was given)")
        return None
    if not isinstance(regions, torch.Tensor):
        raise OpTypeError(f"regions must be a torch.Tensor (B, *S) or None, got {type(regions).__name__}")
    if regions.dtype.is_floating_point or regions.dtype.is_complex or regions.dtype == torch.bool:
        raise OpTypeError(f"regions must be an integer tensor of region ids, got {regions.dtype}")
    if num_regions < 1 or num_regions >= 2**31:
        raise OpValueError(f"num_regions must be in [1, 2^31) when regions are given, got {num_regions}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(regions.shape) != tuple(expected):
        raise OpValueError(
            f"regions must have shape (B, *S) = {tuple(expected)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(regions.shape)}"
        )
    check_same_device(logits, regions=regions)
    return regions if regions.dtype == torch.int64 else regions.long()


def check_same_device(logits: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raises unless every tensor is on the logits' device."""
    for name, t in tensors.items():
        if t.device != logits.device:
            raise OpValueError(f"{name} is on device {t.device} but logits are on device {logits.device}")


def check_region_values(regions: torch.Tensor | None, num_regions: int) -> None:
    """Raises unless every region id is in [0, num_regions) (reads the map once)."""
    if regions is None or regions.numel() == 0:
        return
    lo, hi = torch.aminmax(regions)
    check_region_range(int(lo), int(hi), num_regions)


def check_region_range(lo: int, hi: int, num_regions: int) -> None:
    """Raises unless the smallest and largest region id, lo and hi, lie in [0, num_regions)."""
    if lo < 0 or hi >= num_regions:
        raise OpValueError(
            f"regions must hold ids in [0, num_regions={num_regions}), found values in [{lo}, {hi}]"
        )


def check_loss_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """Checks the shapes, dtypes and devices of area_loss's (B, K) and (K,) inputs."""
    for name, t in (("targets", targets), ("weights", weights), ("index", index), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise OpTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if index.dim() != 2 or index.shape[1] != 2:
        raise OpValueError(f"index must have shape (K, 2) with rows (class, region), got {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise OpTypeError(f"index must be an int64 tensor, got {index.dtype}")
    k = index.shape[0]
    b = logits.shape[0]
    for name, t in (("targets", targets), ("weights", weights)):
        if not t.dtype.is_floating_point:
            raise OpTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (b, k):
            raise OpValueError(f"{name} must have shape (B, K) = {(b, k)}, got {tuple(t.shape)}")
    if not scale.dtype.is_floating_point:
        raise OpTypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
    if tuple(scale.shape) != (k,):
        raise OpValueError(f"scale must have shape (K,) = {(k,)}, got {tuple(scale.shape)}")
    check_same_device(logits, targets=targets, weights=weights, index=index, scale=scale)


def check_index_values(index: torch.Tensor, num_classes: int, num_regions: int) -> None:
    """Raises unless each index row is (class in [0, C), region in [-1, R)), region -1 without a map."""
    if index.numel() == 0:
        return
    cls_lo, cls_hi = (int(v) for v in torch.aminmax(index[:, 0]))
    reg_lo, reg_hi = (int(v) for v in torch.aminmax(index[:, 1]))
    check_index_range(cls_lo, cls_hi, reg_lo, reg_hi, num_classes, num_regions)


def check_index_range(cls_lo: int, cls_hi: int, reg_lo: int, reg_hi: int, num_classes: int, num_regions: int) -> None:
    """Raises unless the class ids of the index rows lie in [0, C) and the region ids in [-1, R)."""
    if cls_lo < 0 or cls_hi >= num_classes:
        raise OpValueError(
            f"index[:, 0] must hold class ids in [0, C={num_classes}), found values in [{cls_lo}, {cls_hi}]"
        )
    if reg_lo < -1 or reg_hi >= num_regions:
        expected = "-1 (whole class; no region map was given)" if num_regions == 0 else f"[-1, {num_regions})"
        raise OpValueError(f"index[:, 1] must hold region ids in {expected}, found values in [{reg_lo}, {reg_hi}]")
