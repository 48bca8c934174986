"""Kernel ops (segcft.ops) against the pure-torch reference: values, gradients, custom-op
registration, torch.compile, autocast, determinism and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcft import ops
from segcft.errors import UserError
from segcft.ops import reference as ref

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

ISAS = ["scalar", "avx2", "avx512"]
# Relative tolerance of areas / gradients per logits dtype (kernel vs reference on the same input).
AREA_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _regions(shape, num_regions, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_regions, (shape[0], *shape[2:]), generator=g)


def _compare(logits, activation, regions, num_regions, spacing=0.7):
    x = logits.detach().requires_grad_()
    y = logits.detach().requires_grad_()
    a = ops.soft_area(x, spacing, activation, regions, num_regions)
    b = ref.soft_area(y, spacing, activation, regions, num_regions)
    assert a.dtype == b.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert a.shape == b.shape
    vol = math.prod(spacing) if isinstance(spacing, list) else spacing
    torch.testing.assert_close(a, b, rtol=AREA_RTOL[logits.dtype], atol=1e-6 * vol)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=a.dtype).to(a.device)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert x.grad.dtype == logits.dtype
    torch.testing.assert_close(
        x.grad.double(), y.grad.double(), rtol=0, atol=GRAD_ATOL[logits.dtype] * w.abs().max().item()
    )


def test_cpu_kernels_are_loaded():
    assert ops.cpu_backend().module is not None, ops.cpu_backend().reason
    assert "instruction set" in ops.cpu_backend().reason


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_regions", [0, 3, 4, 11])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_matches_reference(isa, dtype, num_regions, activation, monkeypatch):
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    for shape in [(2, 4, 37, 29), (1, 3, 7, 5, 3), (2, 1, 50)]:
        logits = _logits(shape, dtype)
        regions = _regions(shape, num_regions) if num_regions else None
        _compare(logits, activation, regions, num_regions)


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 8),
    spatial=st.lists(st.integers(1, 19), min_size=1, max_size=3),
    b=st.integers(1, 3),
    num_regions=st.sampled_from([0, 1, 2, 5, 17]),
    activation=st.sampled_from(["softmax", "sigmoid"]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "channels_last", "channel_slice"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_layouts(c, spatial, b, num_regions, activation, layout, seed):
    shape = (b, c, *spatial)
    logits = _logits(shape, seed=seed)
    if layout == "transposed" and len(spatial) >= 2:
        logits = _logits((b, c, *spatial[:-2], spatial[-1], spatial[-2]), seed=seed).transpose(-1, -2)
    elif layout == "sliced":
        logits = _logits((b, c + 1, *[s * 2 for s in spatial]), seed=seed)[:, 1:, ..., ::2]
        logits = logits[(slice(None), slice(None), *[slice(None, None, 2)] * (len(spatial) - 1))]
    elif layout == "channel_slice":  # rows still contiguous, batch and channel strides not dense
        logits = _logits((b, c + 2, *spatial), seed=seed)[:, 1:-1]
    elif layout == "channels_last" and len(spatial) in (2, 3):
        fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
        logits = logits.contiguous(memory_format=fmt)
    assert logits.shape == shape
    regions = _regions(shape, num_regions, seed + 1) if num_regions else None
    if regions is not None and layout == "transposed" and len(spatial) >= 2:
        regions = regions.transpose(-1, -2).contiguous().transpose(-1, -2)
    _compare(logits, activation, regions, num_regions, spacing=[0.5 + i for i in range(len(spatial))])


@pytest.mark.parametrize("num_regions", [0, 2])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_gradcheck_soft_area_float64(num_regions, activation):
    shape = (2, 3, 5, 4)
    logits = _logits(shape, torch.float64).requires_grad_()
    regions = _regions(shape, num_regions) if num_regions else None
    assert torch.autograd.gradcheck(
        lambda x: ops.soft_area(x, (0.5, 2.0), activation, regions, num_regions), (logits,)
    )


@pytest.mark.parametrize("penalty", ["l1", "l2", "huber"])
@pytest.mark.parametrize("num_regions", [0, 3])
def test_gradcheck_area_loss_float64(penalty, num_regions):
    shape = (2, 3, 4, 3, 2)
    logits = _logits(shape, torch.float64, scale=1.0).requires_grad_()
    regions = _regions(shape, num_regions) if num_regions else None
    index = torch.tensor([[1, -1], [2, -1]] + ([[1, 0], [2, 2]] if num_regions else []))
    k = index.shape[0]
    g = torch.Generator().manual_seed(3)
    targets = (torch.rand(2, k, generator=g, dtype=torch.float64) * 10).requires_grad_()
    weights = torch.rand(2, k, generator=g, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(k, generator=g, dtype=torch.float64) + 1).requires_grad_()

    def fn(x, t, w, s):
        return ops.area_loss(x, t, w, index, s, penalty, 0.8, "softmax", regions, num_regions, huber_delta=0.5)

    assert torch.autograd.gradcheck(fn, (logits, targets, weights, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("penalty", ["l1", "l2", "huber"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_regions", [0, 3])
def test_area_loss_matches_reference(dtype, penalty, activation, num_regions):
    shape = (3, 4, 11, 9, 5)
    logits = _logits(shape, dtype)
    regions = _regions(shape, num_regions) if num_regions else None
    index = torch.tensor([[1, -1], [3, -1], [0, -1]] + ([[2, 1], [3, 0]] if num_regions else []))
    k = index.shape[0]
    g = torch.Generator().manual_seed(9)
    targets = torch.rand(3, k, generator=g) * 300
    weights = torch.rand(3, k, generator=g)
    scale = torch.rand(k, generator=g) * 50 + 10
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    args = (targets, weights, index, scale, penalty, (1.0, 0.5, 2.0), activation, regions, num_regions, 0.7)
    a = ops.area_loss(x, *args)
    b = ref.area_loss(y, *args)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(x.grad.double(), y.grad.double(), rtol=0, atol=GRAD_ATOL[dtype] * 0.1)


def test_opcheck():
    shape = (2, 3, 6, 5)
    logits = _logits(shape).requires_grad_()
    regions = _regions(shape, 3)
    index = torch.tensor([[1, -1], [2, 0]])
    targets, weights, scale = torch.rand(2, 2) * 10, torch.rand(2, 2), torch.ones(2) * 5
    for args in [(logits, None, 0, "softmax", 0.5), (logits, regions, 3, "sigmoid", 2.0)]:
        torch.library.opcheck(torch.ops.segcft.soft_area.default, args)
    torch.library.opcheck(
        torch.ops.segcft.area_loss.default,
        (logits, targets, weights, index, scale, "huber", 0.5, "softmax", regions, 3, 1.0),
    )
    grad = torch.rand(2, 3, 3)
    torch.library.opcheck(torch.ops.segcft.soft_area_backward.default, (logits.detach(), regions, 3, "softmax", grad))
    areas = torch.rand(2, 3, 3) * 10
    for grad_areas in (None, torch.rand(2, 3, 3)):
        torch.library.opcheck(
            torch.ops.segcft.area_loss_backward.default,
            (logits.detach(), regions, 3, "softmax", 0.5, areas, targets, weights, index, scale, "huber", 1.0,
             torch.tensor(0.7), grad_areas),
        )


def test_compile_fullgraph_no_graph_break():
    shape = (2, 3, 8, 6)
    regions = _regions(shape, 2)
    index = torch.tensor([[1, -1], [2, 1]])
    targets, weights, scale = torch.rand(2, 2) * 10, torch.rand(2, 2), torch.ones(2) * 5

    def fn(x):
        areas = ops.soft_area(x, (0.5, 0.5), "softmax", regions, 2)
        loss = ops.area_loss(x, targets, weights, index, scale, "l1", 0.25, "softmax", regions, 2)
        return areas.sum() * 1e-3 + loss

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = _logits(shape).requires_grad_()
    y = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.backward()
    expected = fn(y)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_autocast_bfloat16_logits():
    conv = torch.nn.Conv2d(1, 3, 3, padding=1)
    image = torch.randn(2, 1, 12, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        assert logits.dtype == torch.bfloat16
        areas = ops.soft_area(logits, 0.5)
    assert areas.dtype == torch.float32
    areas[:, 1].sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(areas, ref.soft_area(logits.detach(), 0.5))


def test_deterministic_across_thread_counts():
    shape = (2, 4, 128, 160)  # enough work for two workers
    logits = _logits(shape)
    regions = _regions(shape, 3)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(ops.soft_area(logits, 1.0, "softmax", regions, 3))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_gradient_streamed_matches_reference_and_threads(dtype):
    # Gradients of 4 MiB or more take the non-temporal stores; regions exercise the permute path.
    shape = (3, 4, 384, 384) if dtype == torch.bfloat16 else (2, 4, 384, 384)
    logits = _logits(shape, dtype)
    regions = _regions(shape, 3)
    # Against the float64 reference: the float32 reference's scatter_add drifts by ~3e-5 here.
    x = logits.detach().requires_grad_()
    y = logits.detach().double().requires_grad_()
    a = ops.soft_area(x, 0.5, "softmax", regions, 3)
    b = ref.soft_area(y, 0.5, "softmax", regions, 3)
    torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=0)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    (a * w).sum().backward()
    (b * w.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=0, atol=GRAD_ATOL[dtype] * w.abs().max().item())
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = logits.detach().requires_grad_()
            ops.soft_area(x, 0.5, "softmax", regions, 3).sum().backward()
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_eager_calls_take_the_custom_ops():
    # One call route: in eager mode too, segcft.ops calls torch.ops.segcft.* (forward and backward).
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    shape = (2, 3, 6, 5)
    x = _logits(shape).requires_grad_()
    with Record():
        loss = ops.area_loss(x, torch.rand(2, 1), torch.ones(2, 1), torch.tensor([[1, -1]]), torch.ones(1))
        loss.backward()
        ops.soft_area(x.detach(), regions=_regions(shape, 3), num_regions=3)
    assert [s for s in seen if s.startswith("segcft.")] == [
        "segcft.area_loss.default", "segcft.area_loss_backward.default", "segcft.soft_area.default"]


@pytest.mark.parametrize("num_regions", [0, 3])
def test_public_ops_equal_custom_ops(num_regions):
    # segcft.ops' wrappers (spacing -> voxel volume, the loss output only) against the ops called directly.
    shape = (3, 4, 10, 12)
    logits = _logits(shape)
    regions = _regions(shape, num_regions) if num_regions else None
    index = torch.tensor([[1, -1], [3, -1]] + ([[2, 1], [0, 2]] if num_regions else []))
    k = index.shape[0]
    g = torch.Generator().manual_seed(4)
    targets, weights, scale = torch.rand(3, k, generator=g) * 50, torch.rand(3, k, generator=g), torch.rand(k, generator=g) + 5
    for penalty in ("l1", "l2", "huber"):
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        a = ops.area_loss(x, targets, weights, index, scale, penalty, 0.5, "softmax", regions, num_regions, 0.7)
        b, _ = torch.ops.segcft.area_loss(y, targets, weights, index, scale, penalty, 0.25, "softmax", regions,
                                          num_regions, 0.7)  # spacing 0.5 in 2D: pixel area 0.25
        a.backward()
        b.backward()
        assert torch.equal(a, b) and torch.equal(x.grad, y.grad)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a = ops.soft_area(x, 0.5, "sigmoid", regions, num_regions)
    b = torch.ops.segcft.soft_area(y, regions, num_regions, "sigmoid", 0.25)
    b = b if num_regions else b[..., 0]
    w = torch.rand(a.shape, generator=g)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("num_regions", [0, 3])
def test_python_route_matches_reference(num_regions, monkeypatch):
    # The torch-op route of the ops (CUDA tensors and the reference take it), on the CPU.
    from segcft.ops import _custom

    monkeypatch.setattr(_custom, "_cpu_module", lambda logits: None)
    monkeypatch.setattr(_custom, "_kernel_module", lambda logits: None)
    shape = (2, 3, 7, 5)
    logits = _logits(shape)
    regions = _regions(shape, num_regions) if num_regions else None
    index = torch.tensor([[1, -1], [2, -1]] + ([[0, 1], [2, 2]] if num_regions else []))
    k = index.shape[0]
    g = torch.Generator().manual_seed(6)
    inputs = [torch.rand(2, k, generator=g) * 20, torch.rand(2, k, generator=g), torch.rand(k, generator=g) + 4]
    expected = None
    for route in ("reference", "public", "op"):
        x = logits.clone().requires_grad_()
        t, w, s = (i.clone().requires_grad_() for i in inputs)
        if route == "reference":
            loss = ref.area_loss(x, t, w, index, s, "huber", 0.5, "softmax", regions, num_regions, 0.6)
        elif route == "public":
            loss = ops.area_loss(x, t, w, index, s, "huber", 0.5, "softmax", regions, num_regions, 0.6)
        else:
            loss, _ = torch.ops.segcft.area_loss(x, t, w, index, s, "huber", 0.25, "softmax", regions, num_regions, 0.6)
        loss.backward()
        got = [loss, x.grad, t.grad, w.grad, s.grad]
        if expected is None:
            expected = got
        else:
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_many_channels_and_two_threads_match_reference():
    # 12 channels take the generic (non-specialised) kernels; two threads share the chunks.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        shape = (2, 12, 70, 66)
        _compare(_logits(shape), "softmax", _regions(shape, 3), 3)
        _compare(_logits(shape, seed=3), "sigmoid", None, 0)
    finally:
        torch.set_num_threads(threads)


def test_concurrent_calls_from_python_threads_agree():
    import threading

    shape = (2, 4, 96, 80)
    logits, regions = _logits(shape), _regions(shape, 3)
    expected = ops.soft_area(logits, 1.0, "softmax", regions, 3)
    results: list[torch.Tensor] = []

    def work() -> None:
        for _ in range(5):
            results.append(ops.soft_area(logits, 1.0, "softmax", regions, 3))

    workers = [threading.Thread(target=work) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(results) == 15 and all(torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("bad", [-(2**40), 2**32 + 1, 3])
def test_region_range_is_checked_on_strided_maps(bad):
    # The CPU kernel checks ids while it reads them: all 64 bits count, also on a strided view.
    x = _logits((2, 3, 6, 10))
    r = _regions((2, 3, 6, 20), 3)[..., ::2].clone()[..., :10]
    r = torch.cat([r, r], -1)[..., ::2]
    assert not r.is_contiguous()
    r[1, 4, 3] = bad
    lo, hi = min(bad, 0), max(bad, 2)
    with pytest.raises(ValueError, match=rf"found values in \[{lo}, {hi}\]"):
        ops.soft_area(x, regions=r, num_regions=3)
    index = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="found values in"):
        ops.area_loss(x, torch.zeros(2, 1), torch.ones(2, 1), index, torch.ones(1), regions=r, num_regions=3)


def test_vector_paths_agree_with_scalar(monkeypatch):
    logits = _logits((2, 5, 33, 21))
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
        outs[isa] = ops.soft_area(logits)
    for isa in ISAS[1:]:
        torch.testing.assert_close(outs[isa], outs["scalar"], rtol=1e-6, atol=0)


def test_nan_affects_only_its_areas():
    logits = _logits((2, 3, 10, 10))
    regions = (torch.arange(10) >= 5).long().expand(2, 10, 10).contiguous()
    logits[1, 2, 3, 7] = float("nan")  # batch item 1, region 1
    areas = ops.soft_area(logits, 1.0, "softmax", regions, 2)
    assert torch.isnan(areas[1, :, 1]).all()
    assert torch.isfinite(areas[0]).all() and torch.isfinite(areas[1, :, 0]).all()
    sig = ops.soft_area(logits, 1.0, "sigmoid", regions, 2)
    assert torch.isnan(sig[1, 2, 1]) and torch.isfinite(sig[1, :2]).all()


def test_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0]], [[-1e4, 1e4, 3.0]]]).permute(1, 0, 2).contiguous()
    for activation in ("softmax", "sigmoid"):
        torch.testing.assert_close(
            ops.soft_area(logits, activation=activation), ref.soft_area(logits, activation=activation)
        )


def test_empty_batch():
    out = ops.soft_area(torch.zeros(0, 3, 4, 4))
    assert out.shape == (0, 3)
    out = ops.soft_area(torch.zeros(0, 3, 4, 4), regions=torch.zeros(0, 4, 4, dtype=torch.long), num_regions=2)
    assert out.shape == (0, 3, 2)
    loss = ops.area_loss(torch.zeros(0, 3, 4), torch.zeros(0, 1), torch.zeros(0, 1), torch.tensor([[1, -1]]), torch.ones(1))
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, r: ops.soft_area(x[0, 0]), ValueError, "spatial axes"),
        (lambda x, r: ops.soft_area(x.unsqueeze(-1).unsqueeze(-1)), ValueError, "spatial axes"),
        (lambda x, r: ops.soft_area(x.long()), TypeError, "float32"),
        (lambda x, r: ops.soft_area(x, activation="relu"), ValueError, "activation"),
        (lambda x, r: ops.soft_area(x, spacing=(1.0,)), ValueError, "2 numbers"),
        (lambda x, r: ops.soft_area(x, spacing=0.0), ValueError, "> 0"),
        (lambda x, r: ops.soft_area(x, spacing=(1.0, -2.0)), ValueError, "> 0"),
        (lambda x, r: ops.soft_area(x, spacing="1"), TypeError, "spacing"),
        (lambda x, r: ops.soft_area(x, regions=r, num_regions=2), ValueError, r"\[0, num_regions=2\)"),
        (lambda x, r: ops.soft_area(x, regions=r - 1, num_regions=3), ValueError, "found values in \\[-1"),
        (lambda x, r: ops.soft_area(x, regions=r[:, :3], num_regions=3), ValueError, "shape"),
        (lambda x, r: ops.soft_area(x, regions=r.float(), num_regions=3), TypeError, "integer"),
        (lambda x, r: ops.soft_area(x, num_regions=3), ValueError, "region map"),
        (lambda x, r: ops.soft_area(x, regions=r, num_regions=0), ValueError, "num_regions"),
        (lambda x, r: ops.soft_area(x, regions=r.to("meta"), num_regions=3), ValueError, "device"),
    ],
)
def test_bad_input(call, exc, match):
    x = _logits((2, 3, 6, 5))
    r = _regions((2, 3, 6, 5), 3)
    with pytest.raises(exc, match=match) as info:
        call(x, r)
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"index": torch.tensor([[3, -1]])}, ValueError, r"class ids in \[0, C=3\)"),
        ({"index": torch.tensor([[1, 0]])}, ValueError, "no region map"),
        ({"index": torch.tensor([1, -1])}, ValueError, r"\(K, 2\)"),
        ({"index": torch.tensor([[1.0, -1.0]])}, TypeError, "int64"),
        ({"targets": torch.zeros(3, 1)}, ValueError, "targets must have shape"),
        ({"weights": torch.zeros(2, 2)}, ValueError, "weights must have shape"),
        ({"scale": torch.ones(2)}, ValueError, "scale must have shape"),
        ({"targets": torch.zeros(2, 1, device="meta")}, ValueError, "device"),
        ({"penalty": "l3"}, ValueError, "penalty"),
        ({"huber_delta": 0.0}, ValueError, "huber_delta"),
    ],
)
def test_bad_loss_input(kwargs, exc, match):
    args = {
        "targets": torch.zeros(2, 1),
        "weights": torch.ones(2, 1),
        "index": torch.tensor([[1, -1]]),
        "scale": torch.ones(1),
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.area_loss(_logits((2, 3, 6, 5)), **args)


def test_region_index_out_of_range_with_regions():
    x, r = _logits((2, 3, 6, 5)), _regions((2, 3, 6, 5), 3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        ops.area_loss(x, torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([[1, 3]]), torch.ones(1), regions=r, num_regions=3)


def test_fallback_without_extension_warns_once():
    code = (
        "import sys, warnings\n"
        "sys.modules['segcft._C'] = None\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, segcft.ops as ops\n"
        "    a = ops.soft_area(torch.randn(1, 2, 4, 4))\n"
        "    b = ops.soft_area(torch.randn(1, 2, 4, 4))\n"
        "n = sum(issubclass(w.category, ops.KernelFallbackWarning) for w in caught)\n"
        "assert n == 1, [str(w.message) for w in caught]\n"
        "assert ops.cpu_backend().name == 'reference'\n"
        "print(a.shape)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 2])" in proc.stdout


def test_doctor_reports_backends():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "segcft.ops"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "cpu:  segcft._C" in proc.stdout


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_regions", [0, 3, 11])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_cuda_matches_reference(dtype, num_regions, activation):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        for shape in [(2, 4, 37, 29), (1, 3, 7, 5, 3), (2, 4, 24, 20, 18)]:
            logits = _logits(shape, dtype).cuda()
            regions = _regions(shape, num_regions).cuda() if num_regions else None
            _compare(logits, activation, regions, num_regions)
            _compare(logits.transpose(-1, -2), activation,
                     None if regions is None else regions.transpose(-1, -2), num_regions)


@cuda
def test_cuda_area_loss_and_determinism():
    shape = (2, 4, 32, 40, 24)
    logits = _logits(shape).cuda()
    regions = _regions(shape, 3).cuda()
    index = torch.tensor([[1, -1], [2, 0], [3, 2]], device="cuda")
    targets, weights, scale = torch.rand(2, 3, device="cuda") * 1e3, torch.rand(2, 3, device="cuda"), torch.ones(3, device="cuda") * 1e2
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    args = (targets, weights, index, scale, "l2", 0.5, "softmax", regions, 3)
    a = ops.area_loss(x, *args)
    b = ref.area_loss(y, *args)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
    first = ops.soft_area(logits, 1.0, "softmax", regions, 3)
    assert torch.equal(first, ops.soft_area(logits, 1.0, "softmax", regions, 3))
