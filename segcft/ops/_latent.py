"""The HVAE's posterior sample and KL in one kernel pass per direction (CPU, float32, 2D
channels-last): z = q_loc + t exp(q_logscale) eps and each image's KL(q || p), read straight from
the posterior's and the prior's outputs, with the prior's remaining channels copied out dense.

Written with torch ops, a stochastic block splits both outputs into dense copies and runs about
a dozen element-wise passes over the latents forward and more backward; at 32 x 32 that was a
few per cent of a 2D generator step. :mod:`segcft.models.hvae_blocks` keeps that route for every
other case (:func:`latent_kernel_applies`).
"""

from __future__ import annotations

from typing import Any

import torch

from segcft.ops import _backend
from segcft.ops._validate import OpValueError


def _dense(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def latent_kernel_applies(post: torch.Tensor, prior: torch.Tensor, z_dim: int) -> bool:
    """Whether :func:`posterior_sample` runs on the kernel for these posterior and prior outputs."""
    return (
        post.device.type == "cpu"
        and post.dtype == prior.dtype == torch.float32
        and _dense(post)
        and _dense(prior)
        and post.shape[1] == 2 * z_dim
        and prior.shape[1] >= 2 * z_dim
        and post.shape[0] == prior.shape[0]
        and post.shape[2:] == prior.shape[2:]
        and post.numel() > 0
        and _backend.cpu_backend().module is not None
    )


class _PosteriorSample(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, post: torch.Tensor, prior: torch.Tensor, eps: torch.Tensor, z_dim: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        module = _backend.cpu_backend().module
        assert module is not None  # checked by latent_kernel_applies()
        batch, rows, width = post.shape[0], post.shape[2] * post.shape[3], prior.shape[1]
        z = torch.empty_like(eps)
        feat = torch.empty(
            (batch, width - 2 * z_dim, *post.shape[2:]), dtype=post.dtype, memory_format=torch.channels_last
        )
        kl = torch.empty(batch, dtype=post.dtype)
        feat_ptr = feat.data_ptr() if feat.numel() else 0
        module.latent_forward(
            batch, rows, z_dim, width, post.data_ptr(), prior.data_ptr(), eps.data_ptr(), z.data_ptr(), feat_ptr,
            kl.data_ptr(), temperature, torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(post, prior, eps)
        ctx.z_dim, ctx.temperature = z_dim, temperature
        ctx.set_materialize_grads(False)
        return z, kl, feat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, gz: torch.Tensor | None, gkl: torch.Tensor | None, gfeat: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        module = _backend.cpu_backend().module
        assert module is not None
        post, prior, eps = ctx.saved_tensors
        gz = gz.contiguous(memory_format=torch.channels_last) if gz is not None else None
        gfeat = gfeat.contiguous(memory_format=torch.channels_last) if gfeat is not None and gfeat.numel() else None
        gkl = gkl.contiguous() if gkl is not None else None
        dpost, dprior = torch.empty_like(post), torch.empty_like(prior)
        ptr = [t.data_ptr() if t is not None else 0 for t in (gz, gkl, gfeat)]
        module.latent_backward(
            post.shape[0], post.shape[2] * post.shape[3], ctx.z_dim, prior.shape[1], post.data_ptr(),
            prior.data_ptr(), eps.data_ptr(), *ptr, dpost.data_ptr(), dprior.data_ptr(), ctx.temperature,
            torch.get_num_threads(),
        )  # fmt: skip
        return dpost, dprior, None, None, None


def posterior_sample(
    post: torch.Tensor, prior: torch.Tensor, eps: torch.Tensor, z_dim: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, kl, feat) from the posterior's output post (B, 2 z_dim, H, W) = (q_loc | q_logscale), the
    prior's output prior (B, P, H, W) starting with (p_loc | p_logscale), and the noise eps (B, z_dim,
    H, W), all dense channels-last float32 on the CPU (:func:`latent_kernel_applies`): z = q_loc +
    temperature exp(q_logscale) eps, kl (B,) = KL(q || p) summed over each image in position order,
    feat = the prior's other channels (dense). The values of the torch route to float rounding.
    Other inputs raise :class:`OpValueError`."""
    if not latent_kernel_applies(post, prior, z_dim):
        raise OpValueError(
            f"posterior_sample: post {tuple(post.shape)} and prior {tuple(prior.shape)} must be dense "
            f"channels-last float32 CPU tensors with 2 z_dim = {2 * z_dim} and at least that many channels "
            "and the same batch and size (segcft._C loaded); see latent_kernel_applies"
        )
    want = (post.shape[0], z_dim, *post.shape[2:])
    if tuple(eps.shape) != want or eps.dtype != torch.float32 or eps.device.type != "cpu":
        raise OpValueError(
            f"posterior_sample: eps must be a float32 CPU tensor of shape {want}, got {tuple(eps.shape)}"
        )
    eps = eps.contiguous(memory_format=torch.channels_last)
    return _PosteriorSample.apply(post, prior, eps, z_dim, float(temperature))
