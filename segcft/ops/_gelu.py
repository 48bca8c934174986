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


def gelu_pass(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(x), GELU'(x)) of a dense float32 CPU x from the one-pass kernel, laid out as x
    (element i of each is element i of x)."""
    module = _backend.cpu_backend().module
    assert module is not None  # checked by the callers' routes
    y, dydx = torch.empty_like(x), torch.empty_like(x)
    module.gelu_forward(x.data_ptr(), y.data_ptr(), dydx.data_ptr(), x.numel(), torch.get_num_threads())
    return y, dydx


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y, dydx = gelu_pass(_dense(x))
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
    """conv1x1(GELU(x), weight, bias) with GELU(x) and GELU'(x) from the one-pass kernel and a
    backward in one kernel pass that writes the input gradient d * (g W) directly (the
    convolution's input gradient is never stored and read back for the multiply). Two layouts:
    ``rows`` (channels-last 2D, a position's channels per row: the forward convolves each chunk of
    rows while its GELU is in cache, where oneDNN read GELU(x) back from memory and cost a tenth
    of a millisecond a call at the HVAE's 1 x 1 resolution) and ``planes`` (channels-first 2D or
    3D: both directions on the kernel, vectors of positions, where torch's channels-first 1x1x1
    convolution takes a slow path)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: str) -> torch.Tensor:
        module = _backend.cpu_backend().module
        assert module is not None  # checked by gelu_pointwise_route()
        out_ch, in_ch = weight.shape[:2]
        w = weight.reshape(out_ch, in_ch).contiguous()
        b = bias.contiguous() if bias is not None else None
        b_ptr = b.data_ptr() if b is not None else 0
        ctx.has_bias, ctx.route = bias is not None, route
        if route == "rows":  # each chunk of rows convolved while its GELU is in cache
            y, dydx = torch.empty_like(x), torch.empty_like(x)
            out = torch.empty((x.shape[0], out_ch, *x.shape[2:]), dtype=x.dtype, memory_format=torch.channels_last)
            module.gelu_pointwise_forward(
                x.numel() // in_ch, in_ch, out_ch, x.data_ptr(), w.data_ptr(), b_ptr, y.data_ptr(), dydx.data_ptr(),
                out.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
            ctx.save_for_backward(y, dydx, weight)
            return out
        y, dydx = gelu_pass(x)  # x is dense (the route checked): so are they, alike
        ctx.save_for_backward(y, dydx, weight)
        out = torch.empty((x.shape[0], out_ch, *x.shape[2:]), dtype=x.dtype)
        module.pointwise_cf_forward(
            x.shape[0], x[0, 0].numel(), in_ch, out_ch, y.data_ptr(), w.data_ptr(), b_ptr, out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        module = _backend.cpu_backend().module
        assert module is not None
        y, dydx, weight = ctx.saved_tensors
        out_ch, in_ch = weight.shape[:2]
        w = weight.reshape(out_ch, in_ch).contiguous()
        gx = torch.empty_like(y)
        dw = torch.empty((out_ch, in_ch), dtype=y.dtype)
        db = torch.empty(out_ch, dtype=y.dtype)
        rows = ctx.route == "rows"
        g = grad.contiguous(memory_format=torch.channels_last if rows else torch.contiguous_format)
        ptrs = [t.data_ptr() for t in (g, y, dydx, w, gx, dw, db)]
        if rows:
            module.gelu_pointwise_backward(y.numel() // in_ch, in_ch, out_ch, *ptrs, torch.get_num_threads())
        else:
            module.gelu_pointwise_cf_backward(
                y.shape[0], y[0, 0].numel(), in_ch, out_ch, *ptrs, torch.get_num_threads()
            )
        return gx, dw.view(weight.shape), db if ctx.has_bias else None, None


def gelu_pointwise_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """How :func:`gelu_pointwise` runs ``x``: "rows" (a channels-last 2D x with gradients whose
    channels fill whole 8-lane vectors; 4-channel rows ran slower than oneDNN), "planes" (a
    channels-first 2D or 3D x), or None (torch, which also reports shapes that do not match: another
    device or dtype, a kernel size above 1, no compiled kernels)."""
    if not (
        x.device.type == "cpu"
        and x.dim() in (4, 5)
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (weight.shape[0],)))
        and weight.dim() == x.dim()
        and all(k == 1 for k in weight.shape[2:])
        and weight.shape[1] == x.shape[1]
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and _backend.cpu_backend().module is not None
    ):
        return None
    if x.dim() == 4 and x.shape[1] % 8 == 0 and x.is_contiguous(memory_format=torch.channels_last):
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return "rows" if grad else None
    return "planes" if x.is_contiguous() else None


def gelu_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(gelu(x), weight, bias)`` for a 1x1 ``weight`` (O, C, 1, 1) (``F.conv3d`` and a
    1x1x1 weight for a 5D x); on segcft's CPU kernels where :func:`gelu_pointwise_route` says so
    (the same values to float rounding; the weight gradient sums fixed chunks of positions in
    order, whatever the thread count), through torch otherwise."""
    route = gelu_pointwise_route(x, weight, bias)
    if route is not None:
        return _GELUPointwise.apply(x, weight, bias, route)
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(gelu(x), weight, bias)
