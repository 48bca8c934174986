"""Soft area / soft volume of segmentation logits, the fused Seg-CFT area loss, and a GELU whose
backward is one multiply (`gelu`, `GELU`).

Both run as C++ (segcft._C) and CUDA (segcft._C_cuda) kernels behind torch custom ops
(`torch.ops.segcft.soft_area`, `torch.ops.segcft.area_loss`), so they work under autograd,
torch.compile(fullgraph=True) and autocast. Without the compiled modules the ops fall back to the
pure-torch `segcft.ops.reference` with one warning; `python -m segcft.ops` says which is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segcft.ops import _backend, _custom, reference
from segcft.ops import _validate as v
from segcft.ops._backend import Backend, KernelFallbackWarning, backend_report, cpu_backend, cuda_backend
from segcft.ops._conv3x3 import Conv3x3, Conv3x3x3, conv3x3, gelu_conv3x3
from segcft.ops._gelu import GELU, gelu, gelu_pointwise, gelu_pointwise_route
from segcft.ops._latent import latent_kernel_applies, posterior_sample
from segcft.ops._validate import OpTypeError, OpValueError

__all__ = [
    "GELU",
    "Backend",
    "Conv3x3",
    "Conv3x3x3",
    "KernelFallbackWarning",
    "OpTypeError",
    "OpValueError",
    "area_loss",
    "backend_report",
    "conv3x3",
    "cpu_backend",
    "cuda_backend",
    "gelu",
    "gelu_conv3x3",
    "gelu_pointwise",
    "gelu_pointwise_route",
    "latent_kernel_applies",
    "posterior_sample",
    "reference",
    "soft_area",
]


def soft_area(
    logits: torch.Tensor,
    spacing: float | Sequence[float] = 1.0,
    activation: str = "softmax",
    regions: torch.Tensor | None = None,
    num_regions: int = 0,
) -> torch.Tensor:
    """Soft area (2D) or volume (3D) of each class: float32 (B, C), or (B, C, R) per region.

    logits (B, C, *S) with 1 to 3 spatial axes, float32/float16/bfloat16 (float64 gives float64),
    any strides; spacing is one number or one per spatial axis (areas = sum of probabilities times
    the voxel size); regions (B, *S) holds ids in [0, num_regions).
    """
    nd = v.check_logits(logits)
    v.check_activation(activation)
    vol = v.voxel_volume(spacing, nd)
    regions = v.check_regions(logits, regions, num_regions)
    areas = _custom.soft_area_op(logits, regions, num_regions, activation, vol)
    return areas if regions is not None else areas[..., 0]


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
    """The fused Seg-CFT term: mean over the batch of sum_k weights[b, k] rho((A[b, k] -
    targets[b, k]) / scale[k]).

    targets and weights are (B, K); index (K, 2) int64 rows (class, region), region -1 meaning
    the whole class; scale (K,); targets and scale in physical units; rho is l1, l2 or huber
    (threshold huber_delta). The backward writes dL/dlogits in one pass; no probability tensor
    is stored.
    """
    nd = v.check_logits(logits)
    v.check_activation(activation)
    v.check_penalty(penalty, huber_delta)
    vol = v.voxel_volume(spacing, nd)
    regions = v.check_regions(logits, regions, num_regions)
    v.check_loss_inputs(logits, targets, weights, index, scale)
    index = index.long()
    loss, _ = _custom.area_loss_op(
        logits,
        targets,
        weights,
        index,
        scale,
        penalty,
        vol,
        activation,
        regions,
        num_regions,
        float(huber_delta),
    )
    return loss


if _backend.cpu_backend().module is None:
    _backend.warn_fallback(_backend.cpu_backend())
