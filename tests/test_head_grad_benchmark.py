"""benchmarks/head_grad.py: the candidate route for the likelihood head's weight gradient computes
the same function and gradients as the convolution, so that its GPU timing compares like with like."""

from __future__ import annotations


import pytest
import torch


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last, torch.channels_last_3d])
def test_product_sum_route_has_the_convolutions_value_and_gradients(fmt, load_benchmark) -> None:
    """float64 gradcheck, and every gradient against F.conv's own backward, in any layout."""
    hg = load_benchmark("head_grad")
    torch.manual_seed(0)
    three = fmt == torch.channels_last_3d
    shape = (2, 5, 3, 4, 6) if three else (2, 5, 4, 6)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(2, 5, *([1] * (len(shape) - 2)), dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hg.product_sum_conv, (x, w, b))
    from segcft.models.hvae_blocks import pointwise_conv

    g = torch.randn(shape[0], 2, *shape[2:], dtype=torch.float64)
    ours = torch.autograd.grad(hg.product_sum_conv(x, w, b), (x, w, b), g)
    ref = torch.autograd.grad(pointwise_conv(x, w, b), (x, w, b), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(hg.product_sum_conv(x, w, b), pointwise_conv(x, w, b))


def test_the_step_comparison_restores_the_head_and_keeps_the_loss(load_benchmark) -> None:
    """The step rows come in both routes with the same first loss (the forward is the same), and
    the HVAE's head is the convolution again afterwards."""
    hg = load_benchmark("head_grad")
    from segcft.models import hvae
    from segcft.models.hvae_blocks import pointwise_conv

    rows = hg.step_rows("16x8x8", 1, 1, 1, "cpu")
    assert [(r["case"].split()[2], r["route"]) for r in rows] == [
        ("reg:bf16", "conv"),
        ("reg:bf16", "product-sum"),
        ("pos-seg", "conv"),
        ("pos-seg", "product-sum"),
    ]
    assert rows[0]["first_loss"] == rows[1]["first_loss"] and rows[2]["first_loss"] == rows[3]["first_loss"]
    assert all(float(r["ms"]) > 0 for r in rows)
    assert hvae.pointwise_conv is pointwise_conv
