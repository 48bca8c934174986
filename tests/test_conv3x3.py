"""segcft.ops.conv3x3: the small-channel 3x3 and 3x3x3 kernels against float64 convolutions on
every instruction set, shape and thread count; where they fall back to torch; and the HVAE's use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segcft import ops
from segcft.models.hvae_blocks import conv
from segcft.ops._conv3x3 import conv3x3_applies

pytestmark = pytest.mark.usefixtures("one_thread")

ISAS = ["scalar", "avx2", "avx512"]
needs_kernel = pytest.mark.skipif(ops.cpu_backend().module is None, reason="segcft._C is not built")


def _case(b: int, c: int, *spatial: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if len(spatial) == 2 else torch.channels_last_3d
    x = torch.randn(b, c, *spatial, generator=g).contiguous(memory_format=fmt)
    weight = torch.randn(c, c, *(3,) * len(spatial), generator=g) / 3
    bias = torch.randn(c, generator=g)
    grad = torch.randn(b, c, *spatial, generator=g).contiguous(memory_format=fmt)
    return x, weight, bias, grad


def _conv(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return (F.conv2d if a.dim() == 4 else F.conv3d)(a, w, b, padding=1)


def _run(fn, x, weight, bias, grad, input_grad: bool = True) -> tuple[torch.Tensor | None, ...]:
    x = x.detach().clone().requires_grad_(input_grad)
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_() if bias is not None else None
    y = fn(x, weight, bias)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, weight.grad, bias.grad if bias is not None else None


def _float64(x, weight, bias, grad) -> tuple[torch.Tensor | None, ...]:
    return _run(
        _conv,
        x.double(),
        weight.double(),
        bias.double() if bias is not None else None,
        grad,
    )


SHAPES = [
    (2, 4, 16, 16),
    (3, 4, 5, 17),
    (2, 8, 9, 20),
    (1, 8, 1, 33),
    (1, 4, 1, 40),
    (4, 8, 32, 32),
    (2, 2, 6, 16),
    (2, 2, 8, 6, 21),
    (1, 4, 5, 9, 17),
    (2, 8, 3, 4, 33),
    (1, 2, 1, 1, 16),
    (2, 2, 16, 8, 16),
]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_match_float64(isa, shape, monkeypatch):
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    x, weight, bias, grad = _case(*shape)
    assert conv3x3_applies(x, weight)
    got = _run(ops.conv3x3, x, weight, bias, grad)
    ref = _float64(x, weight, bias, grad)
    for name, a, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert a is not None and r is not None
        assert a.dtype == torch.float32, name
        # float32 sums of 9 C terms (y, dx) or B H W terms (dw, db): 1e-5 of the largest value
        tol = 1e-5 * float(r.abs().max()) + 1e-6
        assert float((a.double() - r).abs().max()) < tol, (name, float((a.double() - r).abs().max()), tol)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[1] is not None and got[1].is_contiguous(memory_format=fmt)


@needs_kernel
@pytest.mark.parametrize(
    "shape", [(2, 4, 9, 20), (2, 2, 5, 6, 17), (1, 8, 3, 3, 16)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_other_layouts(shape, layout):
    """A contiguous (channels-first) input runs the kernel in that layout and keeps it; any other
    layout is made contiguous first."""
    x, weight, bias, grad = _case(*shape, seed=4)
    x, grad = x.contiguous(), grad.contiguous()
    ref = _float64(x, weight, bias, grad)
    base = (torch.cat([x, x], dim=-1) if layout == "strided" else x).detach().requires_grad_()
    view = base[..., : shape[-1]]
    assert view.is_contiguous() == (layout == "contiguous")
    assert conv3x3_applies(view, weight)
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = ops.conv3x3(view, weight, bias)
    y.backward(grad)
    assert y.is_contiguous()
    assert base.grad is not None and weight.grad is not None and bias.grad is not None
    got = (y.detach(), base.grad[..., : shape[-1]], weight.grad, bias.grad)
    for a, r in zip(got, ref):
        assert r is not None
        assert float((a.double() - r).abs().max()) < 1e-5 * float(r.abs().max()) + 1e-6
    if layout == "strided":
        assert float(base.grad[..., shape[-1] :].abs().max()) == 0.0


@needs_kernel
def test_without_bias_or_input_gradient():
    x, weight, _, grad = _case(2, 8, 12, 18, seed=1)
    got = _run(ops.conv3x3, x, weight, None, grad, input_grad=False)
    ref = _float64(x, weight, None, grad)
    assert got[1] is None and got[3] is None
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2].double(), ref[2], rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("spatial", [(20, 24), (6, 10, 17)])
def test_weight_gradient_does_not_depend_on_threads(spatial):
    x, weight, bias, grad = _case(6, 4, *spatial, seed=2)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(ops.conv3x3, x, weight, bias, grad)
        torch.set_num_threads(2)
        two = _run(ops.conv3x3, x, weight, bias, grad)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):
        assert a is not None and b is not None
        assert torch.equal(a, b)


@needs_kernel
def test_instruction_sets_agree(monkeypatch):
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
        outs[isa] = _run(ops.conv3x3, *_case(3, 8, 16, 16, seed=3)) + _run(ops.conv3x3, *_case(2, 2, 4, 8, 16, seed=3))
    for isa in ISAS[1:]:
        for a, b in zip(outs[isa], outs["scalar"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "why",
    ["16 channels", "4 -> 8 channels", "float64", "autocast", "narrow"],
)
def test_falls_back_to_torch(why):
    c, o = (16, 16) if why == "16 channels" else (4, 8) if why == "4 -> 8 channels" else (4, 4)
    x = torch.randn(2, c, 6, 8 if why == "narrow" else 16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(o, c, 3, 3)
    if why == "float64":
        x, weight = x.double(), weight.double()
    if why == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv3x3_applies(x, weight)
            y = ops.conv3x3(x, weight, None)
        assert y.dtype == torch.bfloat16
        return
    assert not conv3x3_applies(x, weight)
    torch.testing.assert_close(ops.conv3x3(x, weight, None), F.conv2d(x, weight, None, padding=1))


def test_hvae_layer_is_a_conv2d_with_the_same_state_dict():
    layer = conv(2, 4, 4, 3)
    assert isinstance(layer, ops.Conv3x3) and isinstance(layer, torch.nn.Conv2d)
    plain = torch.nn.Conv2d(4, 4, 3, padding=1)
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 16).contiguous(memory_format=torch.channels_last)
    assert conv3x3_applies(x, layer.weight)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    assert not isinstance(conv(2, 4, 4, 1), ops.Conv3x3)
    layer3 = conv(3, 2, 2, 3)
    assert isinstance(layer3, ops.Conv3x3x3) and isinstance(layer3, torch.nn.Conv3d)
    plain3 = torch.nn.Conv3d(2, 2, 3, padding=1)
    layer3.load_state_dict(plain3.state_dict())
    x3 = torch.randn(2, 2, 4, 6, 16).contiguous(memory_format=torch.channels_last_3d)
    assert conv3x3_applies(x3, layer3.weight)
    torch.testing.assert_close(layer3(x3), plain3(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_gelu_conv3x3_matches_gelu_then_convolution(dims):
    """conv3x3(GELU(x)) with GELU's derivative applied inside the convolution's backward: values
    and gradients of x, weight and bias as GELU then the convolution in float64."""
    g = torch.Generator().manual_seed(3)
    size = (9, 17) if dims == 2 else (4, 5, 16)
    fmt = torch.channels_last if dims == 2 else torch.contiguous_format
    x = torch.randn(3, 4, *size, generator=g).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(4, 4, *(3,) * dims, generator=g) * 0.3).requires_grad_()
    b = torch.randn(4, generator=g).requires_grad_()
    out = ops.gelu_conv3x3(x, w, b)
    assert out.grad_fn.name() == "_GELUConv3x3Backward"
    weight = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * weight).sum(), (x, w, b))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    conv = F.conv2d if dims == 2 else F.conv3d
    ref = conv(F.gelu(x64), w64, b64, padding=1)
    want = torch.autograd.grad((ref * weight.double()).sum(), (x64, w64, b64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


def test_a_bias_of_another_length_is_torchs_error():
    """conv3x3 and gelu_conv3x3 leave a bias of the wrong length to torch's convolution, which
    reports it, instead of reading past its end."""
    x = torch.randn(2, 4, 5, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, bad = torch.randn(4, 4, 3, 3), torch.zeros(3)
    assert not conv3x3_applies(x, w, bad)
    for fn in (ops.conv3x3, ops.gelu_conv3x3):
        with pytest.raises(RuntimeError):
            fn(x, w, bad)
