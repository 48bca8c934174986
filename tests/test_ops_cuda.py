"""CUDA soft-area kernels (segcft._C_cuda) and the ops on CUDA tensors.

The raw bindings are checked against an independent float64 computation for every kernel path
(dtypes, class-count buckets incl. chunked C > 16, regions, activations, vectorised/strided
layouts, tails, multi-block reduction); the public ops against segcft.ops.reference. Skipped
where torch sees no CUDA device.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = {"softmax": 0, "sigmoid": 1}
# Relative tolerance of gradients written in each dtype (one unit in the last place).
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRAD_ATOL = 2e-6
SUM_RTOL = 1e-5
SUM_ATOL = 1e-4
# Class counts covering every register bucket (2, 4, 8, 16) and the chunked/looped C > 16 paths.
CLASS_COUNTS = [1, 2, 3, 5, 8, 12, 16, 21, 35]
# (B, *S): aligned (vectorised), odd (strided, tails), partial warp tiles, 1D and 3D.
SHAPES = [(2, 64, 64), (3, 37, 53), (2, 40, 40), (2, 1000), (2, 9, 17, 23), (1, 16, 32, 32)]


def _cuda_module():
    from segcft import _C_cuda

    return _C_cuda


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def raw_forward(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> torch.Tensor:
    """Calls soft_area_forward on an output pre-filled with NaN (the kernel must overwrite it)."""
    b, c = logits.shape[:2]
    out = torch.full((b, c, max(num_regions, 1)), float("nan"), device=logits.device)
    _cuda_module().soft_area_forward(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], list(logits.shape), list(logits.stride()),
        regions.data_ptr() if regions is not None else 0,
        list(regions.stride()) if regions is not None else [],
        num_regions, ACTIVATIONS[activation], out.data_ptr(), _stream(logits),
    )
    return out


def raw_backward(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, grad: torch.Tensor
) -> torch.Tensor:
    """Calls soft_area_backward on an output pre-filled with NaN."""
    out = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    _cuda_module().soft_area_backward(
        logits.data_ptr(), DTYPE_CODES[logits.dtype], list(logits.shape), list(logits.stride()),
        regions.data_ptr() if regions is not None else 0,
        list(regions.stride()) if regions is not None else [],
        num_regions, ACTIVATIONS[activation], grad.contiguous().data_ptr(), out.data_ptr(), _stream(logits),
    )
    return out


def expected_sums(logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str) -> torch.Tensor:
    """float64 sums (B, C, max(R, 1)); voxels with a region id outside [0, R) count nowhere."""
    x = logits.double()
    p = x.softmax(1) if activation == "softmax" else x.sigmoid()
    b, c = x.shape[:2]
    flat = p.reshape(b, c, -1)
    if num_regions == 0:
        return flat.sum(-1, keepdim=True)
    ids = regions.reshape(b, 1, -1).expand(b, c, flat.shape[-1])
    ids = torch.where((ids >= 0) & (ids < num_regions), ids, num_regions)
    out = flat.new_zeros(b, c, num_regions + 1).scatter_add_(2, ids, flat)
    return out[..., :num_regions]


def expected_grad(
    logits: torch.Tensor, regions: torch.Tensor | None, num_regions: int, activation: str, grad: torch.Tensor
) -> torch.Tensor:
    """float64 dL/dlogits of L = sum(grad * sums) by autograd."""
    x = logits.detach().double().requires_grad_(True)
    sums = expected_sums(x, regions, num_regions, activation)
    (g,) = torch.autograd.grad((sums * grad.double()).sum(), x)
    return g


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=SUM_RTOL, atol=SUM_ATOL)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert actual.is_contiguous()
    torch.testing.assert_close(
        actual.double().cpu(), expected.cpu(), rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL
    )


def make_logits(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).cuda()


def make_regions(shape: tuple[int, ...], num_regions: int, seed: int, coherent: bool = True) -> torch.Tensor:
    """(B, *S) int64 ids: blocky (piecewise constant, like anatomy) or independent per voxel."""
    g = torch.Generator().manual_seed(seed)
    if not coherent:
        return torch.randint(0, num_regions, shape, generator=g).cuda()
    b, *spatial = shape
    ids = torch.zeros(shape, dtype=torch.int64)
    for axis, size in enumerate(spatial):
        coord = torch.arange(size).reshape([1] + [size if i == axis else 1 for i in range(len(spatial))])
        ids = ids + (coord // max(size // 3, 1)) * (axis + 1)
    ids = ids + torch.arange(b).reshape([b] + [1] * len(spatial))
    return (ids % num_regions).cuda()


def test_module_imports() -> None:
    """The GPU build must provide segcft._C_cuda (the ops would silently use the reference)."""
    module = _cuda_module()
    assert hasattr(module, "soft_area_forward") and hasattr(module, "soft_area_backward")


@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("num_regions", [0, 5])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match(dtype: torch.dtype, activation: str, num_regions: int, classes: int) -> None:
    for i, (b, *spatial) in enumerate(SHAPES):
        shape = (b, classes, *spatial)
        x = make_logits(shape, dtype, seed=i)
        r = make_regions((b, *spatial), num_regions, seed=i, coherent=i % 2 == 0) if num_regions else None
        sums = raw_forward(x, r, num_regions, activation)
        assert_sums_close(sums, expected_sums(x, r, num_regions, activation))
        grad = torch.randn(b, classes, max(num_regions, 1), generator=torch.Generator().manual_seed(i)).cuda()
        gx = raw_backward(x, r, num_regions, activation, grad)
        assert_grad_close(gx, expected_grad(x, r, num_regions, activation, grad), dtype)


def _layouts(dtype: torch.dtype, classes: int, seed: int) -> dict[str, torch.Tensor]:
    base = make_logits((2, classes, 48, 40), dtype, seed)
    base3 = make_logits((2, classes, 12, 16, 20), dtype, seed + 1)
    padded = make_logits((2, classes, 41 * 37 + 3), dtype, seed + 2)
    unaligned = make_logits((2 * classes * 48 * 40 + 1,), dtype, seed + 3)
    return {
        "transposed": base.transpose(-1, -2),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channels_last_3d": base3.contiguous(memory_format=torch.channels_last_3d),
        "strided_slice": make_logits((2, classes, 96, 40), dtype, seed + 4)[:, :, ::2],
        "class_slice": make_logits((2, classes + 2, 48, 40), dtype, seed + 5)[:, 1 : classes + 1],
        "permuted_3d": base3.permute(0, 1, 4, 2, 3),
        # Vectorised path (class stride a multiple of the pack) with a ragged voxel tail.
        "padded_tail": padded[..., : 41 * 37].unflatten(-1, (41, 37)),
        "unaligned": unaligned[1:].view(2, classes, 48, 40),
        "expanded_batch": base[:1].expand(3, -1, -1, -1),
    }


@pytest.mark.parametrize("classes", [1, 3, 8, 20])
@pytest.mark.parametrize("num_regions", [0, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype: torch.dtype, num_regions: int, classes: int) -> None:
    for name, x in _layouts(dtype, classes, seed=classes).items():
        b, _, *spatial = x.shape
        r = None
        if num_regions:
            r = make_regions((b, *spatial), num_regions, seed=3)
            if name == "transposed":
                r = r.transpose(-1, -2).contiguous().transpose(-1, -2)
            if name == "expanded_batch":
                r = r[:1].expand(b, *spatial)
        for activation in ACTIVATIONS:
            sums = raw_forward(x, r, num_regions, activation)
            assert_sums_close(sums, expected_sums(x, r, num_regions, activation))
            grad = torch.randn(b, classes, max(num_regions, 1), generator=torch.Generator().manual_seed(1)).cuda()
            gx = raw_backward(x, r, num_regions, activation, grad)
            assert_grad_close(gx, expected_grad(x, r, num_regions, activation, grad), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_regions", [0, 6])
def test_large_inputs_use_the_two_pass_reduction(dtype: torch.dtype, num_regions: int) -> None:
    shape = (2, 4, 512, 520)
    x = make_logits(shape, dtype, seed=7)
    r = make_regions((2, 512, 520), num_regions, seed=7) if num_regions else None
    for activation in ACTIVATIONS:
        assert_sums_close(raw_forward(x, r, num_regions, activation), expected_sums(x, r, num_regions, activation))


def test_forward_is_deterministic() -> None:
    x = make_logits((3, 5, 256, 300), torch.float32, seed=11)
    r = make_regions((3, 256, 300), 7, seed=11, coherent=False)
    for regions, num_regions in ((None, 0), (r, 7)):
        first = raw_forward(x, regions, num_regions, "softmax")
        for _ in range(3):
            assert torch.equal(raw_forward(x, regions, num_regions, "softmax"), first)


def test_out_of_range_regions_are_ignored() -> None:
    x = make_logits((2, 3, 33, 70), torch.float32, seed=5)
    r = make_regions((2, 33, 70), 6, seed=5, coherent=False) - 1  # ids -1..4 with R = 4: -1 and 4 ignored
    r[0, 0, :5] = 1 << 40
    sums = raw_forward(x, r, 4, "softmax")
    assert_sums_close(sums, expected_sums(x, r, 4, "softmax"))
    grad = torch.randn(2, 3, 4).cuda()
    gx = raw_backward(x, r, 4, "softmax", grad)
    outside = ((r < 0) | (r >= 4)).unsqueeze(1).expand_as(gx)
    assert torch.all(gx[outside] == 0)
    assert_grad_close(gx, expected_grad(x, r, 4, "softmax", grad), torch.float32)


def test_many_regions_fall_back_to_smaller_blocks() -> None:
    """R * C beyond the default shared memory of a 256-thread block (opt-in, fewer warps)."""
    x = make_logits((2, 16, 64, 64), torch.float16, seed=2)
    r = make_regions((2, 64, 64), 1500, seed=2, coherent=False)
    for activation in ACTIVATIONS:
        assert_sums_close(raw_forward(x, r, 1500, activation), expected_sums(x, r, 1500, activation))


def test_too_many_regions_is_a_clear_error() -> None:
    x = make_logits((1, 16, 8, 8), torch.float32, seed=0)
    r = torch.zeros((1, 8, 8), dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="num_regions"):
        raw_forward(x, r, 1_000_000, "softmax")


def test_empty_spatial_gives_zeros_and_empty_batch_is_a_no_op() -> None:
    x = torch.zeros((2, 3, 0, 5), device="cuda")
    assert torch.equal(raw_forward(x, None, 0, "softmax"), torch.zeros(2, 3, 1, device="cuda"))
    y = torch.zeros((0, 3, 4, 5), device="cuda")
    assert raw_forward(y, None, 0, "softmax").shape == (0, 3, 1)
    assert raw_backward(y, None, 0, "softmax", torch.zeros(0, 3, 1, device="cuda")).shape == y.shape


def test_invalid_arguments_raise() -> None:
    module = _cuda_module()
    x = make_logits((1, 2, 8, 8), torch.float32, seed=0)
    out = torch.empty(1, 2, 1, device="cuda")
    args = [x.data_ptr(), 0, list(x.shape), list(x.stride()), 0, [], 0, 0, out.data_ptr(), _stream(x)]
    bad_dtype = list(args)
    bad_dtype[1] = 7
    with pytest.raises(ValueError, match="dtype"):
        module.soft_area_forward(*bad_dtype)
    bad_strides = list(args)
    bad_strides[3] = [1, 2]
    with pytest.raises(ValueError, match="strides"):
        module.soft_area_forward(*bad_strides)
    host = torch.empty(1, 2, 1)
    host_out = list(args)
    host_out[8] = host.data_ptr()
    with pytest.raises(ValueError, match="out_ptr does not point to CUDA device memory"):
        module.soft_area_forward(*host_out)
    host_logits = list(args)
    host_logits[0] = torch.zeros(1, 2, 8, 8).data_ptr()
    with pytest.raises(ValueError, match="logits_ptr does not point to CUDA device memory"):
        module.soft_area_forward(*host_logits)
    grad = torch.zeros(1, 2, 1)
    with pytest.raises(ValueError, match="grad_ptr"):
        module.soft_area_backward(*args[:8], grad.data_ptr(), torch.empty_like(x).data_ptr(), _stream(x))


def test_runs_on_the_given_stream() -> None:
    """Work enqueued earlier on a side stream (zeroing the logits) must be seen by the kernel."""
    x = make_logits((4, 4, 1024, 1024), torch.float32, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.zero_()
        sums = raw_forward(x, None, 0, "softmax")
    side.synchronize()
    assert torch.equal(sums, torch.full_like(sums, 1024 * 1024 / 4))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_non_current_device() -> None:
    x = make_logits((2, 3, 40, 40), torch.float32, seed=4).to("cuda:1")
    with torch.cuda.device(0):
        out = torch.full((2, 3, 1), float("nan"), device="cuda:1")
        _cuda_module().soft_area_forward(
            x.data_ptr(), 0, list(x.shape), list(x.stride()), 0, [], 0, 0, out.data_ptr(),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
        torch.cuda.synchronize(x.device)
    assert_sums_close(out, expected_sums(x, None, 0, "softmax"))


# ---- public ops on CUDA tensors against segcft.ops.reference ------------------------------


def _op_inputs(dtype: torch.dtype, nd: int, layout: str, with_regions: bool, seed: int):
    spatial = (24, 20) if nd == 2 else (8, 12, 10)
    x = make_logits((2, 4, *spatial), dtype, seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    elif layout == "transposed":
        x = x.transpose(-1, -2)
    r = make_regions((2, *x.shape[2:]), 3, seed) if with_regions else None
    return x, r, (3 if with_regions else 0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("with_regions", [False, True])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_area_op_matches_reference(dtype, activation, with_regions, nd, layout) -> None:
    from segcft import ops
    from segcft.ops import reference

    assert ops.cuda_backend().module is not None, ops.cuda_backend().reason
    x, r, num_regions = _op_inputs(dtype, nd, layout, with_regions, seed=nd)
    spacing = 0.7
    xg = x.detach().requires_grad_(True)
    areas = ops.soft_area(xg, spacing=spacing, activation=activation, regions=r, num_regions=num_regions)
    assert areas.dtype == torch.float32 and areas.device.type == "cuda"
    xr = x.detach().cpu().float().requires_grad_(True)
    ref = reference.soft_area(xr, spacing=spacing, activation=activation,
                              regions=r.cpu() if r is not None else None, num_regions=num_regions)
    torch.testing.assert_close(areas.cpu(), ref.detach(), rtol=1e-5, atol=1e-4)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad((areas * w.cuda()).sum(), xg)
    (gr,) = torch.autograd.grad((ref * w).sum(), xr)
    assert g.dtype == dtype and g.shape == x.shape
    torch.testing.assert_close(g.double().cpu(), gr.double(), rtol=GRAD_RTOL[dtype], atol=1e-5)


@pytest.mark.parametrize("penalty", ["l1", "l2", "huber"])
@pytest.mark.parametrize("with_regions", [False, True])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_area_loss_op_matches_reference(dtype, activation, with_regions, penalty) -> None:
    from segcft import ops
    from segcft.ops import reference

    x, r, num_regions = _op_inputs(dtype, 2, "contiguous", with_regions, seed=5)
    rows = [[1, -1], [2, -1], [3, -1]] + ([[1, 0], [3, 2]] if with_regions else [])
    index = torch.tensor(rows, dtype=torch.int64)
    k = index.shape[0]
    g = torch.Generator().manual_seed(3)
    targets = torch.rand(2, k, generator=g) * 150.0
    weights = torch.rand(2, k, generator=g) + 0.5
    scale = torch.rand(k, generator=g) * 40.0 + 10.0
    kwargs = dict(penalty=penalty, spacing=0.5, activation=activation, num_regions=num_regions, huber_delta=0.8)
    xg = x.detach().requires_grad_(True)
    loss = ops.area_loss(xg, targets.cuda(), weights.cuda(), index.cuda(), scale.cuda(),
                         regions=r, **kwargs)
    xr = x.detach().cpu().float().requires_grad_(True)
    ref = reference.area_loss(xr, targets, weights, index, scale,
                              regions=r.cpu() if r is not None else None, **kwargs)
    torch.testing.assert_close(loss.detach().cpu().float(), ref.detach(), rtol=1e-4, atol=1e-5)
    (gl,) = torch.autograd.grad(loss, xg)
    (gr,) = torch.autograd.grad(ref, xr)
    assert gl.dtype == dtype
    torch.testing.assert_close(gl.double().cpu(), gr.double(), rtol=GRAD_RTOL[dtype], atol=1e-5)


# ---- bandwidth sanity ---------------------------------------------------------------------


def _time_ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bandwidth_is_close_to_a_copy(dtype: torch.dtype) -> None:
    """Forward reads the logits once, backward reads and writes them once: both should run at a
    large fraction of the device's copy bandwidth (the memory-traffic floor of docs/method.md section 4.5)."""
    module = _cuda_module()
    x = make_logits((4, 4, 256, 256, 128), dtype, seed=0)
    nbytes = x.numel() * x.element_size()
    args = (x.data_ptr(), DTYPE_CODES[dtype], list(x.shape), list(x.stride()), 0, [], 0, 0)
    stream = _stream(x)
    copy_target = torch.empty_like(x)
    sums = torch.empty(4, 4, 1, device="cuda")
    grad = torch.randn(4, 4, 1, device="cuda")
    copy_ms = _time_ms(lambda: copy_target.copy_(x))
    forward_ms = _time_ms(lambda: module.soft_area_forward(*args, sums.data_ptr(), stream))
    backward_ms = _time_ms(
        lambda: module.soft_area_backward(*args, grad.data_ptr(), copy_target.data_ptr(), stream)
    )
    copy_bw = 2 * nbytes / copy_ms
    forward_ratio = (nbytes / forward_ms) / copy_bw
    backward_ratio = (2 * nbytes / backward_ms) / copy_bw
    print(f"\n{dtype}: copy {copy_bw / 1e6:.0f} GB/s, forward {forward_ratio:.2f} x copy, "
          f"backward {backward_ratio:.2f} x copy")
    assert forward_ratio > 0.6, f"forward at {forward_ratio:.2f} of copy bandwidth"
    assert backward_ratio > 0.6, f"backward at {backward_ratio:.2f} of copy bandwidth"
