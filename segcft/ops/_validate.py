"""Argument checks shared by the kernel ops and the pure-torch reference.

Shape, dtype and device checks read only metadata (safe under torch.compile) and run in the
public functions, in every custom op's body and in its fake (the ops are public:
`torch.ops.segcft.*` may be called directly). The value checks (`check_region_values`,
`check_index_values`, `check_scale_values`, `check_loss_values`) read data and run inside the
op implementations; on the CPU the kernels do them on their own pass over the data instead.
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
# Largest region count R, as kMaxRegions in csrc/soft_area.h and csrc/cuda/soft_area_cuda.h: the
# kernels keep C x R sums per worker, so a stray label value must not become an allocation.
MAX_REGIONS = 4096


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
        raise OpTypeError(f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
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
    if isinstance(huber_delta, bool) or not isinstance(huber_delta, Real) or not 0 < huber_delta < math.inf:
        raise OpValueError(f"huber_delta must be a finite number > 0, got {huber_delta!r}")
    return penalty


def check_positive(name: str, value: float) -> float:
    """Checks a scalar op argument that scales or divides: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
        raise OpValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def voxel_volume(spacing: float | Sequence[float], nd: int) -> float:
    """Pixel area or voxel volume: the product of the spacing (one value or one per spatial axis)."""
    if isinstance(spacing, Real) and not isinstance(spacing, bool):
        values = [float(spacing)] * nd
    elif isinstance(spacing, Sequence) and not isinstance(spacing, str):
        values = list(spacing)
        if len(values) != nd or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise OpValueError(f"spacing must be a number or {nd} numbers (one per spatial axis), got {spacing!r}")
    else:
        raise OpTypeError(f"spacing must be a number or a sequence of numbers, got {type(spacing).__name__}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise OpValueError(f"spacing values must be finite and > 0, got {spacing!r}")
    volume = 1.0
    for value in values:
        volume *= float(value)
    if not 0 < volume < math.inf:
        raise OpValueError(f"spacing {spacing!r} gives a voxel volume of {volume}, expected a finite number > 0")
    return volume


def check_regions(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int) -> torch.Tensor | None:
    """Checks a region map (B, *S) against the logits; returns it as int64 (or None)."""
    if isinstance(num_regions, bool) or not isinstance(num_regions, int) or not 0 <= num_regions <= MAX_REGIONS:
        raise OpValueError(f"num_regions must be an int in [0, {MAX_REGIONS}], got {num_regions!r}")
    if regions is None:
        if num_regions != 0:
            raise OpValueError(f"num_regions={num_regions} needs a region map (regions=None was given)")
        return None
    if not isinstance(regions, torch.Tensor):
        raise OpTypeError(f"regions must be a torch.Tensor (B, *S) or None, got {type(regions).__name__}")
    if regions.dtype.is_floating_point or regions.dtype.is_complex or regions.dtype == torch.bool:
        raise OpTypeError(f"regions must be an integer tensor of region ids, got {regions.dtype}")
    if num_regions < 1:
        raise OpValueError(f"num_regions must be in [1, {MAX_REGIONS}] when regions are given, got {num_regions}")
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
        raise OpValueError(f"regions must hold ids in [0, num_regions={num_regions}), found values in [{lo}, {hi}]")


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


def check_scale_values(scale: torch.Tensor) -> None:
    """Raises unless every entry of area_loss's scale (K,) is finite and > 0 (reads it once)."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        scale_error(k, float(scale[k]))


def check_loss_values(index: torch.Tensor, scale: torch.Tensor, num_classes: int, num_regions: int) -> None:
    """check_index_values and check_scale_values with one read back from the device when all is well."""
    cls, reg = index[:, 0], index[:, 1]
    ok = ((cls >= 0) & (cls < num_classes) & (reg >= -1) & (reg < num_regions)).all()
    if not bool(ok & (torch.isfinite(scale) & (scale > 0)).all()):
        check_index_values(index, num_classes, num_regions)
        check_scale_values(scale)


def scale_error(k: int, value: float) -> None:
    """Raises the error for scale[k] = value, an entry that is not finite and > 0."""
    raise OpValueError(f"scale must hold finite values > 0 (it divides A - t), found scale[{k}] = {value}")


def check_op_inputs(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, voxel_volume: float
) -> torch.Tensor | None:
    """The checks every segcft custom op runs on its shared arguments; returns the region map as
    int64 (or None). Metadata only."""
    check_logits(logits)
    check_activation(activation)
    check_positive("voxel_volume", voxel_volume)
    return check_regions(logits, regions, num_regions)


def check_grad(name: str, grad: torch.Tensor, logits: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Checks a floating-point gradient input of an op: its exact shape and the logits' device."""
    if not isinstance(grad, torch.Tensor):
        raise OpTypeError(f"{name} must be a torch.Tensor, got {type(grad).__name__}")
    if not grad.dtype.is_floating_point:
        raise OpTypeError(f"{name} must be a floating-point tensor, got {grad.dtype}")
    if tuple(grad.shape) != tuple(shape):
        raise OpValueError(f"{name} must have shape {tuple(shape)}, got {tuple(grad.shape)}")
    check_same_device(logits, **{name: grad})
