"""segcft.ops.gelu: the one-pass GELU kernel and its multiply-only backward against float64,
on every instruction set, layout and thread count; and the dense channel split of the HVAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcft import ops
from segcft.models.hvae_blocks import split_dense

pytestmark = pytest.mark.usefixtures("one_thread")

ISAS = ["scalar", "avx2", "avx512"]


def _inputs(n: int = 50_003, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, -9.0, -12.0, 12.0, 0.5, -0.5])
    return torch.cat([torch.randn(n, generator=g) * 3, torch.linspace(-15, 15, 3001), special])


def _gelu_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = ops.gelu(x)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    return y.detach(), x.grad


@pytest.mark.parametrize("isa", ISAS)
def test_values_and_derivative_match_float64(isa, monkeypatch):
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    x = _inputs()
    y, d = _gelu_and_grad(x)
    x64 = x.double()
    y64 = F.gelu(x64)
    d64 = torch.ops.aten.gelu_backward(torch.ones_like(x64), x64)
    scale = x64.abs().clamp_min(1.0)
    # torch's own float32 GELU is within 4e-7 x max(1, |x|) of float64 on these inputs.
    assert ((y.double() - y64).abs() / scale).max() < 2.5e-7
    assert (d.double() - d64).abs().max() < 5e-7
    # torch's own derivative is within 3e-7 of float64 here: the two agree to the sum of the bounds
    torch_d = torch.ops.aten.gelu_backward(torch.ones_like(x), x)
    torch.testing.assert_close(d, torch_d, rtol=0, atol=1e-6)


def test_instruction_sets_agree(monkeypatch):
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
        outs[isa] = _gelu_and_grad(_inputs(seed=3))
    for isa in ISAS[1:]:
        # each path is within the float64 bounds above, so two paths agree within twice them
        torch.testing.assert_close(outs[isa][0], outs["scalar"][0], rtol=2e-6, atol=5e-7)
        torch.testing.assert_close(outs[isa][1], outs["scalar"][1], rtol=0, atol=1e-6)


def test_tails_round_like_full_vectors():
    x = _inputs(n=1000)
    full_y, full_d = _gelu_and_grad(x[:64])
    for n in (1, 7, 15, 17, 33, 63):
        y, d = _gelu_and_grad(x[:n])
        assert torch.equal(y, full_y[:n]) and torch.equal(d, full_d[:n])


def test_layouts_and_strided_inputs_give_the_same_values():
    x = torch.randn(4, 6, 9, 11, generator=torch.Generator().manual_seed(1))
    y, d = _gelu_and_grad(x)
    for variant in (
        x.contiguous(memory_format=torch.channels_last),
        x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    ):
        vy, vd = _gelu_and_grad(variant)
        assert torch.equal(vy, y) and torch.equal(vd, d)
        assert vy.stride() == variant.stride()  # dense inputs keep their layout
    big = torch.randn(4, 12, 9, 11, generator=torch.Generator().manual_seed(1))
    sy, sd = _gelu_and_grad(big[:, ::2])  # not dense: copied first
    ry, rd = _gelu_and_grad(big[:, ::2].contiguous())
    assert torch.equal(sy, ry) and torch.equal(sd, rd)


def test_threads_do_not_change_results():
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(2))
    one = _gelu_and_grad(x)
    torch.set_num_threads(2)
    try:
        two = _gelu_and_grad(x)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_other_cases_use_torch_gelu():
    x = torch.randn(100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ops.gelu(x), F.gelu(x))  # no gradient wanted
    x64 = x.double().requires_grad_()
    assert ops.gelu(x64).grad_fn.name() == "GeluBackward0"
    xr = x.clone().requires_grad_()
    assert ops.gelu(xr).grad_fn.name() == "_GELUBackward"
    with torch.no_grad():
        assert torch.equal(ops.gelu(xr), F.gelu(x))
    assert ops.gelu(torch.empty(0, requires_grad=True)).shape == (0,)
    assert ops.GELU()(xr).grad_fn.name() == "_GELUBackward"


def test_second_derivative_is_refused():
    x = torch.randn(8, requires_grad=True)
    (g,) = torch.autograd.grad(ops.gelu(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_split_dense_equals_split(fmt):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 12, 5, 7, generator=g).contiguous(memory_format=fmt)
    sizes = [4, 4, 4]
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    parts_a = split_dense(a, sizes)
    parts_b = b.split(sizes, dim=1)
    for pa, pb in zip(parts_a, parts_b):
        assert torch.equal(pa, pb)
        if fmt == torch.channels_last:
            assert pa.is_contiguous(memory_format=torch.channels_last)
    w = [torch.randn(p.shape, generator=g) for p in parts_b]
    # the middle part takes no gradient: its slot of the input gradient is zero
    (parts_a[0] * w[0] + parts_a[2] * w[2]).sum().backward()
    (parts_b[0] * w[0] + parts_b[2] * w[2]).sum().backward()
    assert torch.equal(a.grad, b.grad)
    if fmt == torch.channels_last:
        assert a.grad.is_contiguous(memory_format=torch.channels_last)


def _pointwise_case(
    batch: int, c: int, o: int, size: int, seed: int = 6, layout: str = "rows"
) -> tuple[torch.Tensor, ...]:
    """x, weight, bias and an output gradient: channels-last 2D ("rows"), channels-first 2D
    ("planes") or channels-first 3D of depth 3 ("planes3d")."""
    g = torch.Generator().manual_seed(seed)
    spatial = (3, size, size) if layout == "planes3d" else (size, size)
    fmt = torch.channels_last if layout == "rows" else torch.contiguous_format
    x = (torch.randn(batch, c, *spatial, generator=g) * 2).contiguous(memory_format=fmt)
    w = torch.randn(o, c, *(1,) * len(spatial), generator=g) / c**0.5
    b = torch.randn(o, generator=g)
    grad = torch.randn(batch, o, *spatial, generator=g).contiguous(memory_format=fmt)
    return x, w, b, grad


def _pointwise_grads(x, w, b, grad) -> tuple[torch.Tensor, ...]:
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = ops.gelu_pointwise(x, w, b)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad)
    return out.detach(), gx, gw, gb, out.grad_fn.name()


POINTWISE_CASES = [
    (16, 16, 4, 16, "rows"),
    (3, 32, 8, 7, "rows"),
    (2, 48, 5, 13, "rows"),
    (5, 16, 2, 9, "rows"),
    (2, 16, 20, 5, "rows"),
    (1, 32, 48, 3, "rows"),
    (3, 8, 32, 7, "rows"),
    (2, 24, 6, 5, "rows"),
    (4, 8, 2, 11, "planes3d"),
    (2, 2, 8, 16, "planes3d"),
    (3, 5, 3, 7, "planes"),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", POINTWISE_CASES)
def test_gelu_pointwise_matches_float64(isa, shape, monkeypatch):
    """conv1x1(GELU(x)) and its three gradients against float64, on every instruction set, in both
    layouts: row counts that do and do not fill the kernel's 256-position chunks, channel counts of
    one or more whole vectors, position counts with and without a scalar tail, outputs that fill
    part of a vector, one, two or three vectors (the forward's tiles of 4 or 8 rows and the rows
    left over); rows of 8 and 24 channels (whole 8-lane vectors: the AVX2 code on an AVX-512
    build)."""
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    *case, layout = shape
    x, w, b, grad = _pointwise_case(*case, layout=layout)
    assert ops.gelu_pointwise_route(x.requires_grad_(), w, b) == ("rows" if layout == "rows" else "planes")
    out, gx, gw, gb, name = _pointwise_grads(x, w, b, grad)
    assert name == "_GELUPointwiseBackward"
    assert gx.stride() == x.stride() and out.stride() == grad.stride()
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    out64 = conv(F.gelu(x64), w64, b64)
    rx, rw, rb = torch.autograd.grad(out64, (x64, w64, b64), grad.double())
    for got, ref in ((out, out64), (gx, rx), (gw, rw), (gb, rb)):
        scale = ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 2e-6 * max(scale, 1.0)


@pytest.mark.parametrize("layout", ["rows", "planes3d"])
def test_gelu_pointwise_threads_do_not_change_results(layout):
    """The weight and bias gradients sum fixed chunks of positions (rows) or images (planes) in
    order: 1 and 2 threads agree bitwise."""
    case = _pointwise_case(16, 32, 8, 24) if layout == "rows" else _pointwise_case(4, 8, 2, 16, layout=layout)
    one = _pointwise_grads(*case)
    torch.set_num_threads(2)
    try:
        two = _pointwise_grads(*case)
    finally:
        torch.set_num_threads(1)
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)


def test_gelu_pointwise_other_cases_are_gelu_then_conv():
    """Narrow channels-last rows, channels-last rows without a gradient, other strides and float64
    take torch's route, with the same values; channels-first inputs without a gradient the kernel's."""
    x, w, b, _ = _pointwise_case(2, 4, 4, 6)  # 4 channels: not whole 8-lane vectors
    xr = x.clone().requires_grad_()
    assert ops.gelu_pointwise_route(xr, w, b) is None
    assert torch.equal(ops.gelu_pointwise(xr, w, b), F.conv2d(ops.gelu(xr), w, b))
    x, w, b, _ = _pointwise_case(2, 16, 4, 6)
    with torch.no_grad():
        assert ops.gelu_pointwise_route(x, w, b) is None
        assert torch.equal(ops.gelu_pointwise(x, w, b), F.conv2d(F.gelu(x), w, b))
    strided = torch.randn(2, 6, 16, 5)[:, ::2]  # neither layout
    assert ops.gelu_pointwise_route(strided, torch.randn(4, 3, 1, 1), None) is None
    x64 = x.double().requires_grad_()
    assert ops.gelu_pointwise(x64, w.double(), b.double()).grad_fn.name() == "ConvolutionBackward0"
    xc, wc, bc, _ = _pointwise_case(2, 8, 2, 6, layout="planes3d")
    with torch.no_grad():
        assert ops.gelu_pointwise_route(xc, wc, bc) == "planes"
        torch.testing.assert_close(ops.gelu_pointwise(xc, wc, bc), F.conv3d(F.gelu(xc), wc, bc))


def test_gelu_pointwise_bias_of_another_length_is_torchs_error():
    """A bias whose length is not the output channels never reaches the kernels: torch's
    convolution reports it, in both layouts."""
    for layout in ("rows", "planes3d"):
        x, w, _, _ = _pointwise_case(2, 16, 4, 6, layout=layout)
        bad = torch.zeros(3)
        assert ops.gelu_pointwise_route(x.requires_grad_(), w, bad) is None
        with pytest.raises(RuntimeError):
            ops.gelu_pointwise(x, w, bad)
