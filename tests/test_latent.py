"""segcft.ops.posterior_sample: the HVAE's posterior sample and KL in one kernel pass, against
float64 torch maths on every instruction set and thread count, and inside a decoder block against
the torch route it replaces."""

from __future__ import annotations

import pytest
import torch

from segcft import ops

pytestmark = pytest.mark.usefixtures("one_thread")

ISAS = ["scalar", "avx2", "avx512"]


def _case(z: int, feat: int, size: tuple[int, int] = (5, 7), batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    post = (torch.randn(batch, 2 * z, *size, generator=g) * 0.7).contiguous(memory_format=cl)
    prior = (torch.randn(batch, 2 * z + feat, *size, generator=g) * 0.7).contiguous(memory_format=cl)
    eps = torch.randn(batch, z, *size, generator=g)
    weights = [torch.randn(batch, z, *size, generator=g), torch.randn(batch, generator=g)]
    weights.append(torch.randn(batch, feat, *size, generator=g))
    return post, prior, eps, weights


def _torch_route(post, prior, eps, z, t):
    q_loc, q_ls = post[:, :z], post[:, z:]
    p_loc, p_ls, feat = prior[:, :z], prior[:, z : 2 * z], prior[:, 2 * z :]
    sample = q_loc + t * torch.exp(q_ls) * eps
    kl = -0.5 + p_ls - q_ls + 0.5 * (torch.exp(2 * (q_ls - p_ls)) + ((q_loc - p_loc) * torch.exp(-p_ls)) ** 2)
    return sample, kl.flatten(1).sum(1), feat


def _loss(outs, weights, use=(True, True, True)):
    return sum((o * w).sum() for o, w, u in zip(outs, weights, use) if u)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("z,feat", [(8, 16), (16, 0), (3, 5), (24, 8)])
def test_sample_kl_and_gradients_match_float64(isa, z, feat, monkeypatch):
    """z, KL, the prior's other channels and the gradients of post and prior, with whole vectors
    and scalar tails of latent channels, against float64; temperature 0.7."""
    monkeypatch.setenv("SEGCFT_CPU_ISA", isa)
    post, prior, eps, weights = _case(z, feat)
    assert ops.latent_kernel_applies(post, prior, z)
    a, b = post.clone().requires_grad_(), prior.clone().requires_grad_()
    outs = ops.posterior_sample(a, b, eps, z, 0.7)
    assert outs[0].is_contiguous(memory_format=torch.channels_last) and outs[2].shape[1] == feat
    ga, gb = torch.autograd.grad(_loss(outs, weights), (a, b))
    a64, b64 = post.double().requires_grad_(), prior.double().requires_grad_()
    ref = _torch_route(a64, b64, eps.double(), z, 0.7)
    ra, rb = torch.autograd.grad(_loss(ref, [w.double() for w in weights]), (a64, b64))
    for got, want in (*zip(outs, ref), (ga, ra), (gb, rb)):
        if want.numel() == 0:  # no other channels
            continue
        assert (got.double() - want).abs().max().item() <= 2e-5 * max(want.abs().max().item(), 1.0)


def test_unused_outputs_take_no_gradient_and_threads_agree():
    """Only the KL used (z and the features without a gradient): z's and the features' parts of the
    gradients are the KL's alone, and 1 and 2 threads give the same bits."""
    post, prior, eps, weights = _case(8, 8, size=(16, 16), batch=4)

    def run() -> tuple[torch.Tensor, ...]:
        a, b = post.clone().requires_grad_(), prior.clone().requires_grad_()
        outs = ops.posterior_sample(a, b, eps, 8)
        return (*outs, *torch.autograd.grad(_loss(outs, weights, use=(False, True, False)), (a, b)))

    one = run()
    assert torch.equal(one[4][:, 16:], torch.zeros_like(one[4][:, 16:]))  # the features' slot
    torch.set_num_threads(2)
    try:
        two = run()
    finally:
        torch.set_num_threads(1)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_other_cases_are_not_for_the_kernel():
    post, prior, _, _ = _case(4, 4)
    assert not ops.latent_kernel_applies(post.contiguous(), prior, 4)  # channels-first
    assert not ops.latent_kernel_applies(post.double(), prior.double(), 4)
    assert not ops.latent_kernel_applies(post, prior, 3)  # post is not 2 z_dim channels
    assert not ops.latent_kernel_applies(post, prior[:, :6], 4)  # prior narrower than 2 z_dim


@pytest.mark.parametrize("conditional", [False, True])
def test_decoder_block_matches_the_torch_route(conditional, monkeypatch):
    """A stochastic 2D decoder block with an encoder activation: h, p, the noise, the KL and every
    gradient are those of the split-and-element-wise route, to float rounding (same random draws)."""
    from segcft.models import hvae_blocks
    from segcft.models.hvae_blocks import DecoderBlock

    torch.manual_seed(0)
    blk = DecoderBlock(2, 16, 4, 8, 2, "bottleneck", 3, stochastic=True, num_blocks=2, conditional=conditional)
    with torch.no_grad():
        for prm in blk.parameters():
            prm.copy_(torch.randn_like(prm) * 0.2)
    cl = torch.channels_last
    h, p, act = (torch.randn(2, 16, 6, 7).contiguous(memory_format=cl).requires_grad_() for _ in range(3))
    pa = torch.randn(2, 2)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(1)
        out = blk(h, p, pa, act=blk.activate(act))
        loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in out)
        return [*out, *torch.autograd.grad(loss, [h, p, act, *blk.parameters()], allow_unused=True)]

    fused = run()
    monkeypatch.setattr(hvae_blocks, "latent_kernel_applies", lambda *a: False)
    ref = run()
    for a, b in zip(fused, ref):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_argument():
    """Tensors the kernel cannot read, or noise of another shape, are refused with an OpValueError
    naming the argument, before any memory is read."""
    from segcft.ops import OpValueError

    post, prior, eps, *_ = _case(4, 4)
    with pytest.raises(OpValueError, match="post"):
        ops.posterior_sample(post.contiguous(), prior, eps, 4)
    with pytest.raises(OpValueError, match="eps must be"):
        ops.posterior_sample(post, prior, eps[:, :3], 4)
    with pytest.raises(OpValueError, match="eps must be"):
        ops.posterior_sample(post, prior, eps[:2], 4)
