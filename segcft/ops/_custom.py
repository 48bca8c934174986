"""torch.library custom ops over the kernels: segcft::soft_area, segcft::area_loss and their
backwards segcft::soft_area_backward and segcft::area_loss_backward, with fake (meta)
implementations and autograd formulas (register_autograd).

On the CPU the op implementations call segcft._C once per op: the soft-area kernel with the
voxel volume applied, and for the loss the kernel plus the small (B, K) loss and its gradient in
C++. `soft_area` and `area_loss` in segcft.ops call these ops on every route (eager,
torch.compile, tracing, functorch, every device). An eager autograd.Function twin that skipped
the dispatcher saved 0.22-0.28 ms per area-loss call, 0.05-0.1 % of a fine-tuning step, and
was removed (benchmarks/RESULTS.md, "Op call route").

The ops are public (`torch.ops.segcft.*`), so each op body checks all its arguments itself
before any pointer reaches a kernel (`_validate.check_op_inputs` and friends: metadata only),
and the fakes run the same checks. Value checks sit in the shared implementations and ride on
the kernels' own passes: the CPU kernels report the range of the region ids they read and check
the index rows and scale of the loss in C++; the other routes read them with torch.
"""

from __future__ import annotations

import contextlib

import torch

from segcft.ops import _backend, reference
from segcft.ops import _validate as v

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_ACTIVATION_CODES = {"softmax": 0, "sigmoid": 1}
_PENALTY_CODES = {"l1": 0, "l2": 1, "huber": 2}


def _kernel_args(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> tuple:
    if regions is None:
        return (
            logits.data_ptr(),
            _DTYPE_CODES[logits.dtype],
            logits.shape,
            logits.stride(),
            0,
            (),
            0,
            _ACTIVATION_CODES[activation],
        )
    return (
        logits.data_ptr(),
        _DTYPE_CODES[logits.dtype],
        logits.shape,
        logits.stride(),
        regions.data_ptr(),
        regions.stride(),
        num_regions,
        _ACTIVATION_CODES[activation],
    )


def _kernel_module(logits: torch.Tensor):
    """The compiled module for logits' device, or None (after one warning) for the reference."""
    backend = _backend.for_tensor(logits)
    if backend.module is None:
        _backend.warn_fallback(backend)
        return None
    if logits.device.type == "cuda" and logits.dtype == torch.float64:
        return None
    return backend.module


def _cpu_module(logits: torch.Tensor):
    """segcft._C for non-empty CPU logits when it is loaded, else None."""
    if logits.device.type != "cpu" or logits.numel() == 0:
        return None
    return _backend.cpu_backend().module


def _device_tail(logits: torch.Tensor) -> int:
    if logits.device.type == "cuda":
        return torch.cuda.current_stream(logits.device).cuda_stream
    return torch.get_num_threads()


def _raw_sums(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> torch.Tensor:
    """Raw sums (B, C, max(R, 1)) after checking that every region id is in [0, num_regions)
    (CUDA, the reference and empty logits; the CPU kernels take the _cpu_module routes)."""
    module = _kernel_module(logits)
    v.check_region_values(regions, num_regions)
    if module is None:
        return reference.raw_sums(logits, regions, num_regions, activation)
    b, c = logits.shape[:2]
    out = torch.empty((b, c, max(num_regions, 1)), dtype=v.accumulate_dtype(logits.dtype), device=logits.device)
    if logits.numel() == 0:
        return out.zero_()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        module.soft_area_forward(
            *_kernel_args(logits, regions, num_regions, activation), out.data_ptr(), _device_tail(logits)
        )
    return out


def _soft_area_impl(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, voxel_volume: float
) -> torch.Tensor:
    module = _cpu_module(logits)
    if module is None:
        return _raw_sums(logits, regions, num_regions, activation) * voxel_volume
    b, c = logits.shape[:2]
    out = torch.empty((b, c, max(num_regions, 1)), dtype=v.accumulate_dtype(logits.dtype))
    # The kernel reports the range of the region ids it read: the check costs no extra pass.
    id_range = module.soft_area_forward(
        *_kernel_args(logits, regions, num_regions, activation), out.data_ptr(), torch.get_num_threads(), voxel_volume
    )
    if id_range is not None:
        v.check_region_range(id_range[0], id_range[1], num_regions)
    return out


def _soft_area_backward_impl(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dlogits for dL/d(raw sums) = grad."""
    grad = grad.to(v.accumulate_dtype(logits.dtype)).contiguous()
    module = _cpu_module(logits)
    if module is not None:
        out = torch.empty(logits.shape, dtype=logits.dtype)
        bad = module.soft_area_backward(
            *_kernel_args(logits, regions, num_regions, activation),
            grad.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
            1.0,
        )
        if bad is not None:
            _raise_bad_ids(bad, logits.shape[1], num_regions)
        return out
    module = _kernel_module(logits)
    if module is None:
        # The CUDA kernels skip ids outside [0, R); torch's gather would fault on them.
        v.check_region_values(regions, num_regions)
        return reference.raw_backward(logits, regions, num_regions, activation, grad)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.numel() == 0:
        return out
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        module.soft_area_backward(
            *_kernel_args(logits, regions, num_regions, activation),
            grad.data_ptr(),
            out.data_ptr(),
            _device_tail(logits),
        )
    return out


# ---- segcft::soft_area_backward -----------------------------------------------------------


@torch.library.custom_op("segcft::soft_area_backward", mutates_args=())
def soft_area_backward(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dlogits (contiguous, logits dtype) from grad = dL/d(raw sums) (B, C, max(R, 1)):
    recomputes the probabilities from the logits in one pass."""
    regions = v.check_op_inputs(logits, regions, num_regions, activation, 1.0)
    v.check_grad("grad", grad, logits, _sums_shape(logits, num_regions))
    return _soft_area_backward_impl(logits, regions, num_regions, activation, grad)


@soft_area_backward.register_fake
def _(logits, regions, num_regions, activation, grad):
    v.check_op_inputs(logits, regions, num_regions, activation, 1.0)
    v.check_grad("grad", grad, logits, _sums_shape(logits, num_regions))
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ---- segcft::soft_area --------------------------------------------------------------------


@torch.library.custom_op("segcft::soft_area", mutates_args=())
def soft_area_op(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, voxel_volume: float
) -> torch.Tensor:
    """Soft areas (B, C, max(R, 1)) in physical units: one pass over the logits."""
    regions = v.check_op_inputs(logits, regions, num_regions, activation, voxel_volume)
    return _soft_area_impl(logits, regions, num_regions, activation, voxel_volume)


@soft_area_op.register_fake
def _(logits, regions, num_regions, activation, voxel_volume):
    v.check_op_inputs(logits, regions, num_regions, activation, voxel_volume)
    return logits.new_empty(_sums_shape(logits, num_regions), dtype=v.accumulate_dtype(logits.dtype))


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


def _loss_tensors(logits, targets, weights, index, scale):
    acc = v.accumulate_dtype(logits.dtype)
    return (
        targets.to(acc).contiguous(),
        weights.to(acc).contiguous(),
        index.to(torch.int64).contiguous(),
        scale.to(acc).contiguous(),
    )


def _raise_bad_ids(bad: tuple, num_classes: int, num_regions: int) -> None:
    """Raises the error for a C++ error tuple ("index", ...), ("scale", k, value) or ("regions", lo, hi)."""
    if bad[0] == "index":
        v.check_index_range(bad[1], bad[2], bad[3], bad[4], num_classes, num_regions)
    if bad[0] == "scale":
        v.scale_error(bad[1], bad[2])
    v.check_region_range(bad[1], bad[2], num_regions)


def _check_loss_op_inputs(
    logits, regions, num_regions, activation, voxel_volume, targets, weights, index, scale, penalty, huber_delta
) -> torch.Tensor | None:
    """The metadata checks of segcft::area_loss and its backward; returns the region map as int64."""
    regions = v.check_op_inputs(logits, regions, num_regions, activation, voxel_volume)
    v.check_penalty(penalty, huber_delta)
    v.check_loss_inputs(logits, targets, weights, index, scale)
    return regions


def _check_loss_backward_inputs(logits, num_regions, areas, grad_loss, grad_areas) -> None:
    shape = _sums_shape(logits, num_regions)
    v.check_grad("areas", areas, logits, shape)
    v.check_grad("grad_loss", grad_loss, logits, ())
    if grad_areas is not None:
        v.check_grad("grad_areas", grad_areas, logits, shape)


def _sums_shape(logits: torch.Tensor, num_regions: int) -> tuple[int, int, int]:
    """(B, C, max(R, 1)): the shape of the raw sums, the areas and their gradients."""
    return (logits.shape[0], logits.shape[1], max(num_regions, 1))


def _area_loss_impl(
    logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta
):
    module = _cpu_module(logits)
    acc = v.accumulate_dtype(logits.dtype)
    b, c = logits.shape[:2]
    if module is None:
        v.check_loss_values(index, scale, c, num_regions)
        areas = _raw_sums(logits, regions, num_regions, activation) * voxel_volume
        u = (reference.variable_areas(areas, index) - targets.to(acc)) / scale.to(acc)
        loss = (weights.to(acc) * reference.rho(u, penalty, huber_delta)).sum() / max(b, 1)
        return loss, areas
    t, w, idx, s = _loss_tensors(logits, targets, weights, index, scale)
    areas = torch.empty((b, c, max(num_regions, 1)), dtype=acc)
    loss = torch.empty((), dtype=acc)
    bad = module.area_loss_forward(
        *_kernel_args(logits, regions, num_regions, activation),
        areas.data_ptr(),
        torch.get_num_threads(),
        voxel_volume,
        idx.data_ptr(),
        idx.shape[0],
        t.data_ptr(),
        w.data_ptr(),
        s.data_ptr(),
        _PENALTY_CODES[penalty],
        huber_delta,
        loss.data_ptr(),
    )
    if bad is not None:
        _raise_bad_ids(bad, c, num_regions)
    return loss, areas


def _area_loss_backward_impl(
    logits,
    regions,
    num_regions,
    activation,
    voxel_volume,
    areas,
    targets,
    weights,
    index,
    scale,
    penalty,
    huber_delta,
    grad_loss,
    grad_areas,
):
    """dL/dlogits of the area loss from dL/dloss (0-dim) and dL/dareas (or None)."""
    module = _cpu_module(logits)
    acc = v.accumulate_dtype(logits.dtype)
    areas = areas.to(acc).contiguous()
    if module is not None:
        t, w, idx, s = _loss_tensors(logits, targets, weights, index, scale)
        out = torch.empty(logits.shape, dtype=logits.dtype)
        ga = None if grad_areas is None else grad_areas.to(acc).contiguous()
        bad = module.area_loss_backward(
            *_kernel_args(logits, regions, num_regions, activation),
            out.data_ptr(),
            torch.get_num_threads(),
            voxel_volume,
            areas.data_ptr(),
            idx.data_ptr(),
            idx.shape[0],
            t.data_ptr(),
            w.data_ptr(),
            s.data_ptr(),
            _PENALTY_CODES[penalty],
            huber_delta,
            float(grad_loss),
            0 if ga is None else ga.data_ptr(),
        )
        if bad is not None:
            _raise_bad_ids(bad, logits.shape[1], num_regions)
        return out
    v.check_loss_values(index, scale, logits.shape[1], num_regions)
    _b, c, rb = areas.shape
    grad_a = _loss_grad_terms(areas, targets, weights, index, scale, penalty, huber_delta, grad_loss)[0]
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
    return _soft_area_backward_impl(logits, regions, num_regions, activation, g * voxel_volume)


def _loss_grad_terms(areas, targets, weights, index, scale, penalty, huber_delta, grad_loss):
    """(dL/dA (B, K), A - t, u = (A - t) / scale, dL/dloss / B) of the area loss (torch ops)."""
    acc = areas.dtype
    t, w, s = targets.to(acc), weights.to(acc), scale.to(acc)
    diff = reference.variable_areas(areas, index) - t
    u = diff / s
    per_batch = grad_loss.to(acc) / max(areas.shape[0], 1)
    return per_batch * w * _rho_grad(u, penalty, huber_delta) / s, diff, u, per_batch


def _area_loss_other_grads(needs, targets, weights, scale, areas, index, penalty, huber_delta, grad_loss):
    """Gradients for targets, weights and scale (torch ops; rarely needed)."""
    grad_a, diff, u, per_batch = _loss_grad_terms(
        areas, targets, weights, index, scale, penalty, huber_delta, grad_loss
    )
    s = scale.to(areas.dtype)
    g_t = (-grad_a).to(targets.dtype) if needs[1] else None
    g_w = (per_batch * reference.rho(u, penalty, huber_delta)).to(weights.dtype) if needs[2] else None
    g_s = (-(grad_a * diff).sum(0) / s).to(scale.dtype) if needs[4] else None
    return g_t, g_w, g_s


@torch.library.custom_op("segcft::area_loss_backward", mutates_args=())
def area_loss_backward(
    logits: torch.Tensor,
    regions: torch.Tensor | None,
    num_regions: int,
    activation: str,
    voxel_volume: float,
    areas: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    scale: torch.Tensor,
    penalty: str,
    huber_delta: float,
    grad_loss: torch.Tensor,
    grad_areas: torch.Tensor | None,
) -> torch.Tensor:
    """dL/dlogits (contiguous, logits dtype) of segcft::area_loss: the loss gradient dL/dA and
    the soft-area backward in one op."""
    regions = _check_loss_op_inputs(
        logits, regions, num_regions, activation, voxel_volume, targets, weights, index, scale, penalty, huber_delta
    )
    _check_loss_backward_inputs(logits, num_regions, areas, grad_loss, grad_areas)
    return _area_loss_backward_impl(
        logits,
        regions,
        num_regions,
        activation,
        voxel_volume,
        areas,
        targets,
        weights,
        index,
        scale,
        penalty,
        huber_delta,
        grad_loss,
        grad_areas,
    )


@area_loss_backward.register_fake
def _(
    logits,
    regions,
    num_regions,
    activation,
    voxel_volume,
    areas,
    targets,
    weights,
    index,
    scale,
    penalty,
    huber_delta,
    grad_loss,
    grad_areas,
):
    _check_loss_op_inputs(
        logits, regions, num_regions, activation, voxel_volume, targets, weights, index, scale, penalty, huber_delta
    )
    _check_loss_backward_inputs(logits, num_regions, areas, grad_loss, grad_areas)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


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
    regions = _check_loss_op_inputs(
        logits, regions, num_regions, activation, voxel_volume, targets, weights, index, scale, penalty, huber_delta
    )
    return _area_loss_impl(
        logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta
    )


@area_loss_op.register_fake
def _(logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta):
    _check_loss_op_inputs(
        logits, regions, num_regions, activation, voxel_volume, targets, weights, index, scale, penalty, huber_delta
    )
    acc = v.accumulate_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty(_sums_shape(logits, num_regions), dtype=acc)


def _area_loss_setup(ctx, inputs, output) -> None:
    logits, targets, weights, index, scale, penalty, voxel_volume, activation, regions, num_regions, huber_delta = (
        inputs
    )
    ctx.save_for_backward(logits, targets, weights, index, scale, regions, output[1])
    ctx.penalty = penalty
    ctx.voxel_volume = voxel_volume
    ctx.activation = activation
    ctx.num_regions = num_regions
    ctx.huber_delta = huber_delta


def _area_loss_backward(ctx, grad_loss: torch.Tensor, grad_areas: torch.Tensor | None):
    """segcft::area_loss's autograd formula: dL/dlogits through segcft::area_loss_backward, and
    the gradients for targets, weights and scale with torch ops."""
    logits, targets, weights, index, scale, regions, areas = ctx.saved_tensors
    grads: list[torch.Tensor | None] = [None] * 11
    if ctx.needs_input_grad[0]:
        grads[0] = area_loss_backward(
            logits,
            regions,
            ctx.num_regions,
            ctx.activation,
            ctx.voxel_volume,
            areas,
            targets,
            weights,
            index,
            scale,
            ctx.penalty,
            ctx.huber_delta,
            grad_loss,
            grad_areas,
        )
    needs = ctx.needs_input_grad
    if needs[1] or needs[2] or needs[4]:
        grads[1], grads[2], grads[4] = _area_loss_other_grads(
            needs, targets, weights, scale, areas, index, ctx.penalty, ctx.huber_delta, grad_loss
        )
    return tuple(grads)


area_loss_op.register_autograd(_area_loss_backward, setup_context=_area_loss_setup)
