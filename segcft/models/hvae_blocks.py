"""Building blocks of the conditional hierarchical VAE (docs/method.md section 3), 2D and 3D alike.

Every layer takes the number of spatial dimensions as a parameter, so one implementation serves
chest X-rays (2D) and CT volumes (3D). The likelihood and KL maths run in float32 even under
bf16 autocast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcft.ops import (
    GELU,
    Conv3x3,
    Conv3x3x3,
    gelu_conv3x3,
    gelu_pointwise,
    latent_kernel_applies,
    posterior_sample,
)

LOG_BIN_WIDTH = math.log(2.0 / 255.0)
"""Log of the width of one of the 256 intensity bins on [-1, 1]."""


def conv(dims: int, in_ch: int, out_ch: int, kernel: int) -> nn.Conv2d | nn.Conv3d:
    """A same-padded convolution of ``dims`` spatial dimensions with a zero-initialised bias (3x3
    and 3x3x3 ones as :class:`segcft.ops.Conv3x3` / ``Conv3x3x3``, which run few channels on
    segcft's CPU kernel)."""
    layer: nn.Conv2d | nn.Conv3d
    if kernel == 3:
        layer = Conv3x3(in_ch, out_ch) if dims == 2 else Conv3x3x3(in_ch, out_ch)
    else:
        classes: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}
        layer = classes[dims](in_ch, out_ch, kernel, padding=kernel // 2)
    assert layer.bias is not None  # bias=True is the default
    nn.init.zeros_(layer.bias)
    return layer


def avg_pool(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Average-pool by a per-axis factor (2D or 3D)."""
    if all(f == 1 for f in factors):
        return x
    pool = F.avg_pool2d if len(factors) == 2 else F.avg_pool3d
    return pool(x, kernel_size=factors, stride=factors)


def _channels_last(t: torch.Tensor) -> torch.memory_format | None:
    """The channels-last format ``t`` is dense in; None for the default layout and any other."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is None or t.is_contiguous() or not t.is_contiguous(memory_format=fmt):
        return None
    return fmt


class _SplitDense(torch.autograd.Function):
    """Channel split into dense copies, whose backward assembles the input gradient in the
    input's own layout (parts without a gradient contribute zeros)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, sizes: list[int], fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
        ctx.sizes, ctx.fmt = sizes, fmt
        ctx.set_materialize_grads(False)  # an unused part's gradient stays None: zeroed in place below
        return tuple(part.contiguous(memory_format=fmt) for part in t.split(sizes, dim=1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None, None]:
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None, None
        shape = (ref.shape[0], sum(ctx.sizes), *ref.shape[2:])
        out = torch.empty(shape, dtype=ref.dtype, device=ref.device, memory_format=ctx.fmt)
        for part, g in zip(out.split(ctx.sizes, dim=1), grads):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return out, None, None


def split_dense(t: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Split ``t`` along channels into parts that are dense in ``t``'s channels-last layout.

    A channel slice of a channels-last tensor is strided: element-wise ops on it run on slow
    paths and produce gradients in the default layout, which the split's backward would
    concatenate into a tensor that the convolution backward must convert. Dense copies forward
    and a gradient assembled in place backward keep the whole pass in one layout. Same values."""
    fmt = _channels_last(t)
    if fmt is None:
        return tuple(t.split(sizes, dim=1))
    return tuple(_SplitDense.apply(t, sizes, fmt))


def randn_like_dense(t: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped and laid out like ``t``. The draws are made in a contiguous
    tensor, where torch's CPU generator takes its vectorised path (about 7x faster than filling
    a channels-last tensor element by element), then laid out as ``t``."""
    eps = torch.randn(t.shape, dtype=t.dtype, device=t.device)
    fmt = _channels_last(t)
    return eps if fmt is None else eps.contiguous(memory_format=fmt)


def add_into(acc: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``acc + other``, accumulated in place into ``acc`` (a fresh intermediate that nothing saves
    for backward) unless the sum's dtype differs from ``acc``'s (bf16 + fp32 under autocast
    stays fp32). Same values as the out-of-place sum; one fewer full-size tensor to allocate,
    which on a CPU is also pages faulted in again."""
    if torch.result_type(acc, other) != acc.dtype:
        return acc + other
    return acc.add_(other)


def batch_sum(g: torch.Tensor) -> torch.Tensor:
    """g (B, C, *S) summed over the batch -> (1, C, *S), as one reduction over g's memory in its
    own order. For a channels-last g, torch's sum over the batch axis takes a strided path about
    20x slower (2.4 ms against 0.09 ms for 16 x 16 x 64 x 64 on one core)."""
    fmt = _channels_last(g)
    if fmt is None:
        return g.sum(0, keepdim=True)
    order = (0, *range(2, g.dim()), 1)  # (B, *S, C): how a channels-last tensor lies in memory
    flat = g.permute(*order).reshape(g.shape[0], -1).sum(0)
    return flat.view(1, *g.shape[2:], g.shape[1]).permute(0, g.dim() - 1, *range(1, g.dim() - 1))


class _AddBias(torch.autograd.Function):
    """x + bias for a (1, C, *S) bias, added in place into x (a fresh tensor that nothing
    saves), with the bias gradient reduced by :func:`batch_sum`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        return x.add_(bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, batch_sum(grad)


def add_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + bias (a per-position bias of shape (1, C, *S)), accumulated in place into ``x``, which
    must be a fresh tensor that nothing saves for backward. Falls back to the out-of-place sum
    where the dtypes differ (autocast)."""
    if torch.result_type(x, bias) != x.dtype:
        return x + bias
    return _AddBias.apply(x, bias)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 (1x1x1) convolution of x (B, C, *S) with weight (O, C, 1, ...) and bias (O,): the
    likelihood head. One name for it, so that benchmarks/head_grad.py can time other routes."""
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, weight, bias)


def _scaled(scale: torch.Tensor, temperature: float) -> torch.Tensor:
    """temperature * scale, without a pass over the tensor at temperature 1 (the same values)."""
    return scale if temperature == 1.0 else temperature * scale


def broadcast(v: torch.Tensor, dims: int) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ..., 1): a per-sample vector broadcast over ``dims`` spatial axes."""
    return v.reshape(*v.shape, *([1] * dims))


class Block(nn.Module):
    """Pre-activation conv block: ``bottleneck`` (GELU; 1x1, kxk, kxk, 1x1 convs) or ``light``
    (ReLU; kxk, kxk), with an optional residual connection and optional parent conditioning.

    Parents enter as ``Linear(pa)`` added after the first convolution, broadcast over space. For
    a 1x1 first convolution (bottleneck blocks) this is exactly a 1x1 convolution over
    concat(input, tiled pa); for a kxk one it equals it away from the zero-padded border. No
    full-size parent map is ever built."""

    def __init__(
        self,
        dims: int,
        in_width: int,
        mid_width: int,
        out_width: int,
        kind: str,
        kernel: int,
        residual: bool,
        cond_dim: int = 0,
        last_scale: float = 1.0,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.residual = residual
        if kind == "bottleneck":
            shapes = [
                (in_width, mid_width, 1),
                (mid_width, mid_width, kernel),
                (mid_width, mid_width, kernel),
                (mid_width, out_width, 1),
            ]
            self.act: nn.Module = GELU()
        elif kind == "light":
            shapes = [(in_width, mid_width, kernel), (mid_width, out_width, kernel)]
            self.act = nn.ReLU()
        else:
            raise ValueError(f"unknown block type {kind!r}")
        convs = [conv(dims, i, o, k) for i, o, k in shapes]
        self.convs = nn.ModuleList(convs)
        self.cond = nn.Linear(cond_dim, shapes[0][1]) if cond_dim > 0 else None
        self.skip = conv(dims, in_width, out_width, 1) if residual and in_width != out_width else None
        last = convs[-1]
        with torch.no_grad():
            if zero_last:
                last.weight.zero_()
            else:
                last.weight.mul_(last_scale)

    def act_conv(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """layer(act(x)); a 1x1 or 3x3 convolution after GELU as one op
        (:func:`segcft.ops.gelu_pointwise`, :func:`segcft.ops.gelu_conv3x3`)."""
        if isinstance(self.act, GELU):
            if isinstance(layer, Conv3x3 | Conv3x3x3):
                return gelu_conv3x3(x, layer.weight, layer.bias)
            if isinstance(layer, nn.Conv2d | nn.Conv3d) and all(k == 1 for k in layer.kernel_size):
                return gelu_pointwise(x, layer.weight, layer.bias)
        return layer(self.act(x))

    def hidden(self, x: torch.Tensor, pa: torch.Tensor | None = None) -> torch.Tensor:
        """The activation the last convolution reads: the block up to that convolution."""
        return self.act(self.pre_hidden(x, pa))

    def pre_hidden(self, x: torch.Tensor, pa: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`hidden` before its activation."""
        return self.pre_hidden_from(self.act_conv(self.convs[0], x), pa)

    def pre_hidden_from(self, first: torch.Tensor, pa: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`pre_hidden` from the first convolution's output ``first`` (a fresh tensor: the
        parents' term accumulates into it)."""
        h = add_into(first, broadcast(self.cond(pa), self.dims)) if self.cond is not None else first
        for layer in self.convs[1:-1]:
            h = self.act_conv(layer, h)
        return h

    def forward(self, x: torch.Tensor, pa: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act_conv(self.convs[-1], self.pre_hidden(x, pa))
        if not self.residual:
            return h
        return add_into(h, x if self.skip is None else self.skip(x))  # = x + h (addition commutes)


def gaussian_kl(
    q_loc: torch.Tensor, q_logscale: torch.Tensor, p_loc: torch.Tensor, p_logscale: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) of diagonal Gaussians, summed over all but the batch axis, in float32 -> (B,)."""
    q_loc, q_logscale, p_loc, p_logscale = (t.float() for t in (q_loc, q_logscale, p_loc, p_logscale))
    kl = (
        -0.5
        + p_logscale
        - q_logscale
        + 0.5 * (torch.exp(2 * (q_logscale - p_logscale)) + ((q_loc - p_loc) * torch.exp(-p_logscale)) ** 2)
    )
    return kl.flatten(1).sum(1)


def discretised_gaussian_log_prob(x: torch.Tensor, loc: torch.Tensor, logscale: torch.Tensor) -> torch.Tensor:
    """Per-pixel log-probability of x in [-1, 1] under a Gaussian discretised into 256 bins
    (edge bins take the tails), in float32. Falls back to the density times the bin width where
    the bin mass underflows, so the gradient never vanishes.

    On the CPU the edge bins' log-CDFs (``log_ndtr``, the costliest op here) are evaluated for the
    edge pixels alone (a fifth of a chest X-ray, none of a CT volume) and scattered into place: the
    same values element by element. Elsewhere every branch is evaluated and selected, which needs no
    host sync."""
    x, loc, logscale = x.float(), loc.float(), logscale.float()
    inv_scale = torch.exp(-logscale)
    centred = x - loc
    upper = inv_scale * (centred + 1.0 / 255.0)
    lower = inv_scale * (centred - 1.0 / 255.0)
    mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    mid = inv_scale * centred
    log_pdf_mid = -0.5 * mid**2 - logscale - 0.5 * math.log(2 * math.pi)
    log_mass = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_pdf_mid + LOG_BIN_WIDTH)
    low, high = x < -0.999, x > 0.999
    if x.device.type == "cpu":
        low, high = low.expand_as(log_mass), high.expand_as(log_mass)
        out = log_mass.masked_scatter(low, torch.special.log_ndtr(upper[low]))
        return out.masked_scatter(high, torch.special.log_ndtr(-lower[high]))
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    return torch.where(low, log_cdf_upper, torch.where(high, log_sf_lower, log_mass))


class DecoderBlock(nn.Module):
    """One top-down block: prior p(z | z_<) from the prior path ``p`` (and the parents when
    ``conditional``), posterior q(z | z_<, x, pa) from (decoder state, encoder activation,
    parents), then the state update h += prior features + proj(concat(z, pa)) and a residual block.
    With ``map_size`` (``parent_maps``) the update adds sum_p pa_p M_p too: a learned map per
    parent over the positions and channels, zero at init, a parent's own pattern in the image.

    The block's exogenous noise is z itself for a parent-free prior and the standardised
    eps = (z - mu_p) / sigma_p for a conditional one: fixed noise decoded under other parents then
    gives z* = mu_p(pa*) + sigma_p(pa*) eps. Deterministic blocks (above ``z_max_res``) take z as
    the prior mean and have no posterior."""

    def __init__(
        self,
        dims: int,
        width: int,
        mid_width: int,
        z_dim: int,
        num_parents: int,
        kind: str,
        kernel: int,
        stochastic: bool,
        num_blocks: int,
        conditional: bool = False,
        map_size: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.z_dim = z_dim
        self.stochastic = stochastic
        self.conditional = conditional
        scale = 1.0 / math.sqrt(num_blocks)
        self.prior = Block(
            dims,
            width,
            mid_width,
            2 * z_dim + width,
            kind,
            kernel,
            residual=False,
            cond_dim=num_parents if conditional else 0,
            zero_last=True,
        )
        self.posterior = (
            Block(dims, 2 * width, mid_width, 2 * z_dim, kind, kernel, residual=False, cond_dim=num_parents)
            if stochastic
            else None
        )
        # z_proj + pa_proj is a 1x1 convolution over concat(z, tiled pa), with pa broadcast.
        self.z_proj = conv(dims, z_dim, width, 1)
        self.pa_proj = nn.Linear(num_parents, width)
        # parent maps: sum_p pa_p M_p, one map per parent, zero at init, stored (P, *map_size, width)
        # so that the parents' term comes out in the channels-last order of the decoder state
        self.pa_maps = nn.Parameter(torch.zeros(num_parents, *map_size, width)) if map_size is not None else None
        self.prior_z_proj = conv(dims, z_dim, width, 1)
        self.resnet = Block(dims, width, mid_width, width, kind, kernel, residual=True, last_scale=scale)
        with torch.no_grad():
            layers: tuple[nn.Conv2d | nn.Conv3d | nn.Linear, ...] = (self.z_proj, self.pa_proj, self.prior_z_proj)
            for layer in layers:
                layer.weight.mul_(scale)
            nn.init.zeros_(self.pa_proj.bias)

    def forward(
        self,
        h: torch.Tensor,
        p: torch.Tensor,
        pa: torch.Tensor,
        act: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        temperature: float = 1.0,
        need_prior: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns (h, p, noise, kl): ``noise`` is the block's exogenous noise (z, or eps for a
        conditional prior; None for a deterministic block). z comes from, in order: the ``noise``
        argument (fixed latents), the posterior when ``act`` (the encoder activation after
        :meth:`activate`) is given (with kl (B,)), the prior at ``temperature`` otherwise.
        ``need_prior=False`` (the decoder's last block, whose prior state nothing reads) skips
        the prior state's update and returns p as None."""
        if not self.stochastic:
            h, p_out = self._deterministic(h, p, pa, need_prior)
            return h, p_out, None, None
        prior = self.prior(p, pa) if self.conditional else self.prior(p)
        if noise is None and act is not None:
            post = self._posterior(h, act, pa)
            if latent_kernel_applies(post, prior, self.z_dim):  # one kernel pass for z, KL and p_feat
                zd = self.z_dim
                eps = torch.randn((post.shape[0], zd, *post.shape[2:]), dtype=post.dtype)  # as randn_like_dense
                z, q_kl, p_feat = posterior_sample(post, prior, eps, zd, temperature)
                noise = (z - prior[:, :zd]) * torch.exp(-prior[:, zd : 2 * zd]) if self.conditional else z
                h, p_out = self._update(h, p, pa, z, p_feat, need_prior)
                return h, p_out, noise, q_kl
        p_loc, p_logscale, p_feat = split_dense(prior, [self.z_dim, self.z_dim, prior.shape[1] - 2 * self.z_dim])
        kl = None
        if noise is not None:
            z = p_loc + torch.exp(p_logscale) * noise if self.conditional else noise
        elif act is not None:
            q_loc, q_logscale = split_dense(post, [self.z_dim, self.z_dim])
            z = q_loc + _scaled(torch.exp(q_logscale), temperature) * randn_like_dense(q_loc)
            kl = gaussian_kl(q_loc, q_logscale, p_loc, p_logscale)
        else:
            z = p_loc + _scaled(torch.exp(p_logscale), temperature) * randn_like_dense(p_loc)
        if noise is None:
            noise = (z - p_loc) * torch.exp(-p_logscale) if self.conditional else z
        h, p_out = self._update(h, p, pa, z, p_feat, need_prior)
        return h, p_out, noise, kl

    def _update(
        self,
        h: torch.Tensor,
        p: torch.Tensor,
        pa: torch.Tensor,
        z: torch.Tensor,
        p_feat: torch.Tensor,
        need_prior: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, p) after the block from its z and the prior's features (p None without ``need_prior``)."""
        # the sums accumulate into the fresh projection outputs, which nothing saves
        update = add_into(add_into(add_into(self.z_proj(z), h), p_feat), self._parent_term(pa))
        h = self.resnet(update)
        p_out = add_into(add_into(self.prior_z_proj(z), p), p_feat) if need_prior else None
        return h, p_out

    def activate(self, act: torch.Tensor) -> torch.Tensor:
        """The posterior's nonlinearity of an encoder activation: what :meth:`forward` takes as
        ``act``. It depends on the stage only, so the decoder computes it once per stage for all of
        that stage's blocks."""
        assert self.posterior is not None  # built whenever the block is stochastic
        return self.posterior.act(act)

    def _posterior(self, h: torch.Tensor, act: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """posterior(concat(h, encoder activation), pa) with ``act`` already activated: the first
        convolution over the concatenation is the sum of one convolution over each part (the
        weight split by input channel per call), so no concatenated copy is built, forward or
        backward, and the activation of the encoder's part is shared by the stage's blocks."""
        post = self.posterior
        assert post is not None  # built whenever the block is stochastic
        first = post.convs[0]
        assert isinstance(first, nn.Conv2d | nn.Conv3d)
        conv_fn = F.conv2d if self.dims == 2 else F.conv3d
        width = h.shape[1]
        if all(k == 1 for k in first.kernel_size) and isinstance(post.act, GELU):
            t = gelu_pointwise(h, first.weight[:, :width], first.bias)
        else:
            t = conv_fn(post.act(h), first.weight[:, :width], first.bias, padding=first.padding)
        t = add_into(t, conv_fn(act, first.weight[:, width:], None, padding=first.padding))
        return post.act_conv(post.convs[-1], post.pre_hidden_from(t, pa))

    def _deterministic(
        self, h: torch.Tensor, p: torch.Tensor, pa: torch.Tensor, need_prior: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, p) of a deterministic block, where z is the prior mean: the same maths as the
        stochastic path with z = p_loc, but z_proj(p_loc) and prior_z_proj(p_loc) are linear maps
        of the prior's last activation, so each folds with p_feat into one convolution of it
        (weights composed per call, gradients flow to every original parameter). Two
        convolutions to ``width`` channels replace one to 2 z_dim + width, two z projections,
        the channel split and two full-size sums, forward and backward; the unused log-scale is
        never computed. Equal to the stochastic path's sums up to float rounding."""
        g = self.prior.hidden(p, pa if self.conditional else None)
        last = self.prior.convs[-1]
        assert isinstance(last, nn.Conv2d | nn.Conv3d) and last.bias is not None
        zd = self.z_dim
        w_loc, w_feat = last.weight[:zd], last.weight[2 * zd :]
        b_loc, b_feat = last.bias[:zd], last.bias[2 * zd :]
        conv_fn = F.conv2d if self.dims == 2 else F.conv3d
        out = []
        for proj in (self.z_proj, self.prior_z_proj) if need_prior else (self.z_proj,):
            assert proj.bias is not None
            w_proj = proj.weight.flatten(1)  # (width, z_dim): a 1x1 convolution
            weight = w_feat + torch.einsum("oc,ci...->oi...", w_proj, w_loc)
            bias = b_feat + w_proj @ b_loc + proj.bias
            out.append(conv_fn(g, weight, bias, padding=last.padding))
        # the convolution outputs are fresh and saved by nothing: the sums accumulate into them
        h = self.resnet(add_into(add_into(out[0], h), self._parent_term(pa)))
        return h, add_into(out[1], p) if need_prior else None

    def _parent_term(self, pa: torch.Tensor) -> torch.Tensor:
        """What the parents add to the decoder state: Linear(pa) broadcast over space, plus
        sum_p pa_p M_p with parent maps. With maps, both are one matrix product, pa @ (M + W^T)
        + b, whose (B, *size, C) result is returned as a channels-last (B, C, *size) view: one
        full-size tensor, laid out as the 2D decoder state is (a 2D generator step on one thread:
        +15-16 ms for the maps, against +18-21 ms adding a separate map term)."""
        if self.pa_maps is None:
            return broadcast(self.pa_proj(pa), self.dims)
        maps, weight, bias = self.pa_maps, self.pa_proj.weight, self.pa_proj.bias
        positions = math.prod(maps.shape[1:-1])
        per_parent = maps + weight.t().reshape(maps.shape[0], *([1] * self.dims), maps.shape[-1])
        term = torch.addmm(bias.repeat(positions), pa, per_parent.flatten(1))
        return term.view(pa.shape[0], *maps.shape[1:]).movedim(-1, 1)
