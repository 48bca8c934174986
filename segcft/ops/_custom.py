"""torch.library custom ops over the kernels: segcft::soft_area, segcft::area_loss and the shared
backward segcft::soft_area_backward, with fake (meta) implementations and autograd formulas."""

from __future__ import annotations

import contextlib

import torch

from segcft.ops import _backend, reference
from segcft.ops import _validate as v

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_ACTIVATION_CODES = {"softmax": 0, "sigmoid": 1}


def _kernel_args(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str
) -> tuple:
    if regions is None:
        return (logits.data_ptr(), _DTYPE_CODES[logits.dtype], list(logits.shape), list(logits.stride()),
                0, [], 0, _ACTIVATION_CODES[activation])
    return (logits.data_ptr(), _DTYPE_CODES[logits.dtype], list(logits.shape), list(logits.stride()),
            regions.data_ptr(), list(regions.stride()), num_regions, _ACTIVATION_CODES[activation])


def _kernel_module(logits: torch.Tensor):
    """The compiled module for logits' device, or None (after one warning) for the reference."""
    backend = _backend.for_tensor(logits)
    if backend.module is None:
        _backend.warn_fallback(backend)
        return None
    if logits.device.type == "cuda" and logits.dtype == torch.float64:
        return None
    return backend.module


def _device_tail(logits: torch.Tensor) -> int:
    if logits.device.type == "cuda":
        return torch.cuda.current_stream(logits.device).cuda_stream
    return torch.get_num_threads()


def _raw_sums(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> torch.Tensor:
    """Raw sums (B, C, max(R, 1)) after checking that every region id is in [0, num_regions).

    The CPU kernel reports the range of the ids it read, so the check costs no extra pass over
    the region map there; elsewhere the map is checked first.
    """
    module = _kernel_module(logits)
    fused_check = module is not None and not logits.is_cuda and logits.numel() > 0
    if not fused_check:
        v.check_region_values(regions, num_regions)
    if module is None:
        return reference.raw_sums(logits, regions, num_regions, activation)
    b, c = logits.shape[:2]
    out = torch.empty((b, c, max(num_regions, 1)), dtype=v.accumulate_dtype(logits.dtype), device=logits.device)
    if logits.numel() == 0:
        return out.zero_()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        id_range = module.soft_area_forward(*_kernel_args(logits, regions, num_regions, activation),
                                            out.data_ptr(), _device_tail(logits))
    if fused_check and id_range is not None:
        v.check_region_range(id_range[0], id_range[1], num_regions)
    return out


# ---- segcft::soft_area_backward -----------------------------------------------------------


@torch.library.custom_op("segcft::soft_area_backward", mutates_args=())
def soft_area_backward(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dlogits (contiguous, logits dtype) from grad = dL/d(raw sums) (B, C, max(R, 1)):
    recomputes the probabilities from the logits in one pass."""
    module = _kernel_module(logits)
    grad = grad.to(v.accumulate_dtype(logits.dtype)).contiguous()
    if module is None:
        return reference.raw_backward(logits, regions, num_regions, activation, grad)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return out
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        module.soft_area_backward(*_kernel_args(logits, regions, num_regions, activation), grad.data_ptr(),
                                  out.data_ptr(), _device_tail(logits))
    return out


@soft_area_backward.register_fake
def _(logits, regions, num_regions, activation, grad):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ---- segcft::soft_area --------------------------------------------------------------------


@torch.library.custom_op("segcft::soft_area", mutates_args=())
def soft_area_op(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, voxel_volume: float
) -> torch.Tensor:
    """Soft areas (B, C, max(R, 1)) in physical units: one pass over the logits."""
    return _raw_sums(logits, regions, num_regions, activation) * voxel_volume


@soft_area_op.register_fake
def _(logits, regions, num_regions, activation, voxel_volume):
    b, c = logits.shape[:2]
    return logits.new_empty((b, c, max(num_regions, 1)), dtype=v.accumulate_dtype(logits.dtype))


def _soft_area_setup(ctx, inputs, output) -> None:
    logits, regions, num_regions, activation, voxel_volume = inputs
    ctx.save_for_backward(logits, regions)
    ctx.num_regions = num_regions
    ctx.activation = activation
    ctx.voxel_volume = voxel_volume


def _soft_area_backward(ctx, grad: torch.Tensor):
    logits, regions = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = soft_area_backward(logits, regions, ctx.num_regions, ctx.activation, grad * ctx.voxel_volume)
    return grad_logits, None, None, None, None


soft_area_op.register_autograd(_soft_area_backward, setup_context=_soft_area_setup)


# ---- segcft::area_loss --------------------------------------------------------------------


def _rho_grad(u: torch.Tensor, penalty: str, huber_delta: float) -> torch.Tensor:
    if penalty == "l1":
        return torch.sign(u)
    if penalty == "l2":
        return 2 * u
    return u.clamp(-huber_delta, huber_delta)


@torch.library.custom_op("segcft::area_loss", mutates_args=())
def area_loss_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    scale: torch.Tensor,
    penalty: str,
    voxel_volume: float,
    activation: str,
    regions: torch.Tensor | None,
    num_regions: int,
    huber_delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, areas): the batch mean of sum_k w rho((A - t) / scale), and the areas
    (B, C, max(R, 1)) it was computed from (kept for the backward; tiny)."""
    v.check_index_values(index, logits.shape[1], num_regions)
    acc = v.accumulate_dtype(logits.dtype)
    areas = _raw_sums(logits, regions, num_regions, activation) * voxel_volume
    u = (reference.variable_areas(areas, index) - targets.to(acc)) / scale.to(acc)
    loss = (weights.to(acc) * reference.rho(u, penalty, huber_delta)).sum() / max(logits.shape[0], 1)
    return loss, areas


@area_loss_op.register_fake
def _(logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta):
    b, c = logits.shape[:2]
    acc = v.accumulate_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((b, c, max(num_regions, 1)), dtype=acc)


def _area_loss_setup(ctx, inputs, output) -> None:
    logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta = inputs
    ctx.save_for_backward(logits, targets, weights, index, scale, regions, output[1])
    ctx.penalty = penalty
    ctx.voxel_volume = voxel_volume
    ctx.activation = activation
    ctx.num_regions = num_regions
    ctx.huber_delta = huber_delta


def _area_loss_backward(ctx, grad_loss: torch.Tensor, grad_areas: torch.Tensor | None):
    logits, targets, weights, index, scale, regions, areas = ctx.saved_tensors
    acc = areas.dtype
    b, c, rb = areas.shape
    t, w, s = targets.to(acc), weights.to(acc), scale.to(acc)
    diff = reference.variable_areas(areas, index) - t
    u = diff / s
    per_batch = grad_loss.to(acc) / max(b, 1)
    drho = _rho_grad(u, ctx.penalty, ctx.huber_delta)
    grad_a = per_batch * w * drho / s  # dL/dA (B, K)
    grads: list[torch.Tensor | None] = [None] * 11
    if ctx.needs_input_grad[0]:
        cls = torch.nn.functional.one_hot(index[:, 0].long(), c).to(acc)  # (K, C)
        reg = index[:, 1].long()
        reg_map = torch.where(
            (reg < 0).unsqueeze(1),
            torch.ones(reg.shape[0], rb, dtype=acc, device=areas.device),
            torch.nn.functional.one_hot(reg.clamp(min=0), rb).to(acc),
        )  # (K, R')
        # A broadcast product summed over k rather than einsum: einsum lowers to a BLAS bmm that
        # starts the BLAS thread pool for these tiny (B, K) tensors and stalls on a loaded machine.
        g = (grad_a[:, :, None, None] * cls[None, :, :, None] * reg_map[None, :, None, :]).sum(1)
        if grad_areas is not None:
            g = g + grad_areas
        grads[0] = soft_area_backward(logits, regions, ctx.num_regions, ctx.activation, g * ctx.voxel_volume)
    if ctx.needs_input_grad[1]:
        grads[1] = (-grad_a).to(targets.dtype)
    if ctx.needs_input_grad[2]:
        grads[2] = (per_batch * reference.rho(u, ctx.penalty, ctx.huber_delta)).to(weights.dtype)
    if ctx.needs_input_grad[4]:
        grads[4] = (-(grad_a * diff).sum(0) / s).to(scale.dtype)
    return tuple(grads)


area_loss_op.register_autograd(_area_loss_backward, setup_context=_area_loss_setup)
