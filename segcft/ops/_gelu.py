"""GELU (exact, erf form) whose backward is one multiply: the CPU kernel writes GELU(x) and
GELU'(x) in one pass (they share the one exp), and autograd keeps the derivative instead of x.
:func:`gelu_pointwise`, a 1x1 convolution of GELU(x), also folds that multiply into the
convolution's backward.

torch's own GELU backward evaluates erf and exp again over the whole tensor; in the HVAE, whose
blocks apply GELU before every convolution, that was a seventh of a training step on the CPU.
Other devices, dtypes and the no-grad path use ``torch.nn.functional.gelu``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcft.ops import _backend

_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when its elements fill its storage in some standard layout, else a contiguous copy."""
    for fmt in _DENSE_FORMATS:
        if x.is_contiguous(memory_format=fmt):
            return x
    return x.contiguous()


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        module = _backend.cpu_backend().module
        assert module is not None  # checked by gelu()
        x = _dense(x)
        y, dydx = torch.empty_like(x), torch.empty_like(x)  # same strides: element i <-> element i
        module.gelu_forward(x.data_ptr(), y.data_ptr(), dydx.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(dydx)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (dydx,) = ctx.saved_tensors
        return dydx * grad


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x Phi(x) (the exact form, as ``F.gelu``); on the CPU in float32 with gradients,
    through the one-pass kernel (values within 2e-7 x max(1, |x|) of float64)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.numel() > 0
        and _backend.cpu_backend().module is not None
    ):
        return _GELU.apply(x)
    return F.gelu(x)


class GELU(nn.Module):
    """``nn.GELU()`` (exact form) computed by :func:`gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


class _GELUPointwise(torch.autograd.Function):
    """conv1x1(GELU(x), weight, bias) for a channels-last 2D x: forward as :class:`_GELU` and
    oneDNN's convolution; backward in one pass of the CPU kernel over GELU(x), GELU'(x) and the
    output gradient, which writes the input gradient d * (g W) directly: the convolution's input
    gradient is never stored and read back for the multiply."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module = _backend.cpu_backend().module
        assert module is not None  # checked by gelu_pointwise()
        y, dydx = torch.empty_like(x), torch.empty_like(x)  # x is dense channels-last: so are they
        module.gelu_forward(x.data_ptr(), y.data_ptr(), dydx.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(y, dydx, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(y, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        module = _backend.cpu_backend().module
        assert module is not None
        y, dydx, weight = ctx.saved_tensors
        g = grad.contiguous(memory_format=torch.channels_last)
        out_ch, in_ch = weight.shape[:2]
        w = weight.reshape(out_ch, in_ch).contiguous()
        gx = torch.empty_like(y)
        dw = torch.empty((out_ch, in_ch), dtype=y.dtype)
        db = torch.empty(out_ch, dtype=y.dtype)
        ptrs = (t.data_ptr() for t in (g, y, dydx, w, gx, dw, db))
        module.gelu_pointwise_backward(y.numel() // in_ch, in_ch, out_ch, *ptrs, torch.get_num_threads())
        return gx, dw.view(weight.shape), db if ctx.has_bias else None


def gelu_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(gelu(x), weight, bias)`` for a 1x1 ``weight`` (O, C, 1, 1) (``F.conv3d`` for a
    5D x); on the CPU in float32 with gradients, for a channels-last 2D x whose channels fill whole
    16-lane vectors (C a multiple of 16; narrower rows ran slower than oneDNN), through one kernel
    pass backward (the same values to float rounding: the weight gradient sums fixed chunks of 256
    positions in order, whatever the thread count)."""
    if (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and weight.shape[2:] == (1, 1)
        and x.shape[1] % 16 == 0
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.numel() > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and _backend.cpu_backend().module is not None
    ):
        return _GELUPointwise.apply(x, weight, bias)
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(gelu(x), weight, bias)
