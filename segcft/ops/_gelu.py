"""GELU (exact, erf form) whose backward is one multiply: the CPU kernel writes GELU(x) and
GELU'(x) in one pass (they share the one exp), and autograd keeps the derivative instead of x.

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
