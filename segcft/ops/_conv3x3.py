"""3x3 (2D) and 3x3x3 (3D) convolutions of float32 images with 2, 4 or 8 channels, on segcft's
CPU kernel (channels-last or contiguous layout).

The HVAE's bottleneck blocks run two such convolutions per block at the highest resolutions (4
channels at 64 x 64 and 8 at 32 x 32 in the 2D quick preset; 2 at 64 x 32 x 32 and 4 at
32 x 16 x 16 in 3D), and oneDNN runs them far below the FMA peak: its blocked kernels pad the
channel axis to a whole vector. The kernel transposes each image into zero-padded channel planes,
so every vector lane holds a pixel (csrc/cpu/conv3x3_impl.h). Same maths as ``F.conv2d`` /
``F.conv3d`` up to float rounding; the weight gradient is summed image by image in order, so it
does not depend on the thread count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcft.ops import _backend
from segcft.ops._gelu import gelu, gelu_pass

CHANNELS = (2, 4, 8)
"""Channel counts (in = out) with a kernel; csrc/cpu/kernels.h ``conv3x3_supported`` agrees."""
MIN_WIDTH = 16
"""Rows narrower than this leave most of a 16-lane vector empty: oneDNN is faster there."""
_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The channels-last format when x is laid out so, else the contiguous (channels-first) one."""
    fmt = _FORMATS[x.dim()]
    return fmt if x.is_contiguous(memory_format=fmt) else torch.contiguous_format


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int, bool]:
    """(batch, channels, d, h, w, 3D) of a 4D (d = 1) or 5D input."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        return b, c, 1, h, w, False
    b, c, d, h, w = x.shape
    return b, c, d, h, w, True


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's convolution of a dense x (channels-last or contiguous) into a fresh output."""
    module = _backend.cpu_backend().module
    assert module is not None  # checked by conv3x3_applies()
    b, c, d, h, w, d3 = _geometry(x)
    o = weight.shape[0]
    fmt = _layout(x)
    weight = weight.contiguous()
    y = torch.empty((b, o, *x.shape[2:]), dtype=x.dtype, memory_format=fmt)
    bias = bias.contiguous() if bias is not None else None  # held: the kernel reads its memory
    bias_ptr = bias.data_ptr() if bias is not None else 0
    cl = fmt != torch.contiguous_format
    ok = module.conv3x3_forward(
        b, c, o, d, h, w, d3, cl, x.data_ptr(), weight.data_ptr(), bias_ptr, y.data_ptr(), torch.get_num_threads()
    )
    assert ok, f"no 3x3 kernel for {c} -> {o} channels"  # CHANNELS mirrors the C++ check
    return y


def _backward(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_gx: bool, mult: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(gx, dw, db) of :func:`_forward` for the output gradient grad; gx times ``mult`` (laid out
    as x) when given, multiplied in the kernel's pass."""
    module = _backend.cpu_backend().module
    assert module is not None
    b, c, d, h, w, d3 = _geometry(x)
    o = weight.shape[0]
    fmt = _layout(x)
    grad = grad.contiguous(memory_format=fmt)
    gx = torch.empty_like(x) if need_gx else None
    dw = torch.empty_like(weight)
    db = torch.empty(o, dtype=weight.dtype)
    cl = fmt != torch.contiguous_format
    gx_ptr = gx.data_ptr() if gx is not None else 0
    mult_ptr = mult.data_ptr() if mult is not None else 0
    ptrs = (x.data_ptr(), weight.data_ptr(), grad.data_ptr(), gx_ptr, dw.data_ptr(), db.data_ptr())
    module.conv3x3_backward(b, c, o, d, h, w, d3, cl, *ptrs, torch.get_num_threads(), mult_ptr)
    return gx, dw, db


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x, weight = x.contiguous(memory_format=_layout(x)), weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        gx, dw, db = _backward(x, weight, grad, ctx.needs_input_grad[0])
        return gx, dw, db if ctx.has_bias else None


class _GELUConv3x3(torch.autograd.Function):
    """conv3x3(GELU(x)): GELU(x) and GELU'(x) in one pass (as :func:`segcft.ops.gelu`), the
    convolution on the kernel, and a backward whose input gradient is multiplied by GELU'(x) while
    each image is still in cache, instead of in a separate pass over the batch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x, weight = x.contiguous(memory_format=_layout(x)), weight.contiguous()
        y, dydx = gelu_pass(x)
        ctx.save_for_backward(y, dydx, weight)
        ctx.has_bias = bias is not None
        return _forward(y, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        y, dydx, weight = ctx.saved_tensors
        gx, dw, db = _backward(y, weight, grad, ctx.needs_input_grad[0], mult=dydx)
        return gx, dw, db if ctx.has_bias else None


def conv3x3_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`conv3x3` runs the kernel for this input, weight and bias (else ``F.conv2d``,
    which also reports shapes that do not match)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (weight.shape[0],)))
        and x.dim() in _FORMATS
        and tuple(weight.shape[1:]) == (x.shape[1],) + (3,) * (x.dim() - 2)
        and weight.shape[0] == x.shape[1]
        and x.shape[1] in CHANNELS
        and x.shape[-1] >= MIN_WIDTH
        and not torch.is_autocast_enabled("cpu")
        and _backend.cpu_backend().module is not None
    )


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (C, C, 3, 3) weight (``F.conv3d`` for a
    (C, C, 3, 3, 3) one): on the CPU kernel for a float32 x with C in :data:`CHANNELS` and rows of
    at least :data:`MIN_WIDTH` pixels outside autocast, through torch otherwise. The output keeps
    x's layout (channels-last, or else contiguous)."""
    if conv3x3_applies(x, weight, bias):
        return _Conv3x3.apply(x, weight, bias)
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, weight, bias, padding=1)


def gelu_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(gelu(x), weight, bias)``: on the kernel with gradients wherever :func:`conv3x3`
    is (GELU's derivative applied inside the convolution's backward; the same values), through
    those two functions otherwise."""
    if conv3x3_applies(x, weight, bias) and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _GELUConv3x3.apply(x, weight, bias)
    return conv3x3(gelu(x), weight, bias)


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(channels, channels, 3, padding=1)`` computed by :func:`conv3x3` (the same
    parameters and state-dict keys)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias)


class Conv3x3x3(nn.Conv3d):
    """``nn.Conv3d(channels, channels, 3, padding=1)`` computed by :func:`conv3x3` (the same
    parameters and state-dict keys)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias)
