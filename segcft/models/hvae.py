"""The image mechanism: a conditional VDVAE-style hierarchical VAE (docs/method.md section 3).

A bottom-up encoder keeps the last activation of every resolution; a top-down decoder starts
from a learned bias at the lowest resolution and runs prior/posterior/update blocks up to the
full resolution. Parents enter (as (B, P) vectors broadcast over space) the posterior, the state
updates and, with ``prior: conditional``, the prior. The latents' exogenous noise is z itself
under a parent-free prior, and eps = (z - mu_p) / sigma_p under a conditional one. The
likelihood is a discretised Gaussian on [-1, 1]. Counterfactuals abduct that noise once and the
pixel noise u = (x - mu) / sigma, then decode them under the counterfactual parents.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from segcft.errors import ConfigError
from segcft.models.configs import HVAEConfig
from segcft.models.hvae_blocks import (
    Block,
    DecoderBlock,
    add_bias,
    avg_pool,
    conv,
    discretised_gaussian_log_prob,
    pointwise_conv,
)
from segcft.ops import gelu, gelu_pointwise, gelu_pointwise_route

if TYPE_CHECKING:
    from segcft.data.variables import DatasetInfo

PRESETS: dict[str, dict[str, object]] = {
    # 64x64 in minutes on two CPU cores: stages 64, 32, 16, 8, 1; narrow at the two high
    # resolutions, where the compute is.
    "64": dict(
        widths=(16, 32, 64, 96, 192),
        enc_blocks=(1, 1, 2, 2, 1),
        dec_blocks=(1, 2, 2, 3, 2),
        pool=(2, 2, 2, 8),
        z_dim=8,
        z_max_res=32,
        bias_max_res=64,
        bottleneck=4,
        block="bottleneck",
    ),
    # Chest X-ray paper scale (causal-gen mimic192): stages 192, 96, 48, 24, 12, 6, 1.
    "192": dict(
        widths=(32, 64, 96, 128, 160, 192, 512),
        enc_blocks=(1, 3, 7, 11, 7, 3, 2),
        dec_blocks=(2, 4, 8, 12, 8, 4, 2),
        pool=(2, 2, 2, 2, 2, 6),
        z_dim=16,
        z_max_res=96,
        bias_max_res=64,
        bottleneck=4,
        block="bottleneck",
    ),
    # 64x32x32 volumes (16 times the voxels of a 64x64 image): stages 64x32x32, 32x16x16,
    # 16x8x8, 8x4x4, 4x2x2, narrow at full resolution.
    "3d": dict(
        widths=(8, 16, 48, 64, 96),
        enc_blocks=(1, 1, 1, 2, 2),
        dec_blocks=(1, 1, 2, 2, 2),
        pool=(2, 2, 2, 2),
        z_dim=8,
        z_max_res=16,
        bias_max_res=64,
        bottleneck=4,
        block="bottleneck",
    ),
}
"""Architecture defaults per preset; any field set in ``HVAEConfig`` overrides them. The preset
"auto" picks one from the image shape (:func:`auto_preset`)."""

ARCH_FIELDS = (
    "widths",
    "enc_blocks",
    "dec_blocks",
    "pool",
    "z_dim",
    "z_max_res",
    "bias_max_res",
    "bottleneck",
    "block",
)


def auto_preset(shape: tuple[int, ...]) -> str:
    """The preset for an image shape: "3d" for volumes, "64" for images up to 64 pixels a side,
    "192" (paper scale) for larger ones."""
    if len(shape) == 3:
        return "3d"
    return "64" if max(shape) <= 64 else "192"


def resolve_config(config: HVAEConfig, shape: tuple[int, ...] | None = None) -> HVAEConfig:
    """The config with every architecture field left at its "preset" value filled from the preset
    (for "auto", the preset :func:`auto_preset` picks for ``shape``, which is then required)."""
    if config.preset == "auto":
        if shape is None:
            raise ConfigError("generator.preset: 'auto' needs the image shape to pick a preset")
        config = replace(config, preset=auto_preset(tuple(shape)))
    if config.preset not in PRESETS:
        raise ConfigError(
            f"generator.preset: unknown HVAE preset {config.preset!r}; expected auto or one of {sorted(PRESETS)}"
        )
    preset = PRESETS[config.preset]
    updates: dict[str, Any] = {
        name: preset[name] if not getattr(config, name) else getattr(config, name) for name in ARCH_FIELDS
    }
    for name in ("widths", "enc_blocks", "dec_blocks", "pool"):
        updates[name] = tuple(int(v) for v in updates[name])
    return replace(config, **updates)


@dataclass(frozen=True)
class Stage:
    """One resolution of the hierarchy: spatial size, width and block counts."""

    size: tuple[int, ...]
    width: int
    enc_blocks: int
    dec_blocks: int
    stochastic: bool
    bias: bool

    @property
    def res(self) -> int:
        """The longest axis, the number ``z_max_res`` and ``bias_max_res`` are compared with."""
        return max(self.size)

    @property
    def kernel(self) -> int:
        return 1 if self.res <= 2 else 3


def plan_stages(config: HVAEConfig, shape: tuple[int, ...]) -> list[Stage]:
    """Stage sizes from the image shape and the pool factors (each capped per axis at the axis
    size, so anisotropic volumes pool only along axes that are still larger than the factor
    allows). Raises ConfigError for inconsistent lists or indivisible sizes."""
    n = len(config.widths)
    if n == 0 or len(config.enc_blocks) != n or len(config.dec_blocks) != n or len(config.pool) != n - 1:
        raise ConfigError(
            "generator: widths, enc_blocks and dec_blocks need one entry per stage and pool one fewer; got "
            f"widths={config.widths}, enc_blocks={config.enc_blocks}, dec_blocks={config.dec_blocks}, "
            f"pool={config.pool}"
        )
    for key in ("widths", "pool"):
        if any(v < 1 for v in getattr(config, key)):
            raise ConfigError(f"generator.{key}: every entry must be >= 1, got {getattr(config, key)}")
    if any(v < 1 for v in config.enc_blocks) or any(v < 1 for v in config.dec_blocks):
        raise ConfigError("generator.enc_blocks/dec_blocks: every stage needs at least one block")
    if config.z_dim < 1 or config.bottleneck < 1 or config.z_max_res < 1:
        raise ConfigError("generator: z_dim, bottleneck and z_max_res must be >= 1")
    if config.block not in ("bottleneck", "light"):
        raise ConfigError(f"generator.block: expected 'bottleneck' or 'light', got {config.block!r}")
    if any(w // config.bottleneck < 1 for w in config.widths):
        raise ConfigError(
            f"generator.bottleneck: {config.bottleneck} leaves no channels for width {min(config.widths)}"
        )
    sizes = [tuple(shape)]
    for k in config.pool:
        factors = tuple(min(k, s) for s in sizes[-1])
        if any(s % f for s, f in zip(sizes[-1], factors)):
            raise ConfigError(
                f"generator.pool: factor {k} does not divide the stage size {sizes[-1]} (image shape {tuple(shape)})"
            )
        sizes.append(tuple(s // f for s, f in zip(sizes[-1], factors)))
    stages = [
        Stage(size, w, e, d, stochastic=max(size) <= config.z_max_res, bias=max(size) <= config.bias_max_res)
        for size, w, e, d in zip(sizes, config.widths, config.enc_blocks, config.dec_blocks)
    ]
    if not any(s.stochastic for s in stages):
        raise ConfigError(
            f"generator.z_max_res: {config.z_max_res} is below every stage size {[s.size for s in stages]}; no latents"
        )
    return stages


def parent_map_stages(config: HVAEConfig, stages: list[Stage]) -> list[Stage]:
    """The stages whose decoder blocks get parent maps: none without ``parent_maps`` (whatever the
    cap, so that ``--set generator.parent_maps=false`` turns off a preset's capped maps), else those
    up to ``parent_maps_max_res`` (0: all). A cap below every stage is a ConfigError."""
    cap = config.parent_maps_max_res
    if not config.parent_maps:
        return []
    mapped = [s for s in stages if not cap or s.res <= cap]
    if not mapped:
        raise ConfigError(
            f"generator.parent_maps_max_res: {cap} is below every stage size {[s.size for s in stages]}; no maps"
        )
    return mapped


@dataclass
class Latents:
    """The exogenous noise of z ~ q(z | x, pa), one tensor per stochastic decoder block, top-down:
    z itself (parent-free prior) or eps = (z - mu_p) / sigma_p (conditional prior).

    Differentiable (never detached by the model); ``decode`` accepts it under any parents."""

    z: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return len(self.z)

    @property
    def batch_size(self) -> int:
        return self.z[0].shape[0]

    def detach(self) -> Latents:
        return Latents(tuple(t.detach() for t in self.z))

    def repeat(self, n: int) -> Latents:
        """The latents of every sample repeated n times along the batch axis (sample-major)."""
        return Latents(tuple(t.repeat(n, *([1] * (t.dim() - 1))) for t in self.z))


class HVAE(nn.Module):
    """Conditional hierarchical VAE p(x | z, pa) p(z) with posterior q(z | x, pa); implements
    the Generator protocol for 2D and 3D images."""

    def __init__(self, config: HVAEConfig, shape: tuple[int, ...], num_parents: int) -> None:
        super().__init__()
        if num_parents < 1:
            raise ConfigError("generator: the HVAE needs at least one parent variable in the dataset")
        self.config = resolve_config(config, tuple(shape))
        self.spatial_dims = len(shape)
        self.shape = tuple(shape)
        self.num_parents = num_parents
        self.stages = plan_stages(self.config, self.shape)
        if self.config.prior not in ("exogenous", "conditional"):
            raise ConfigError(f"generator.prior: expected 'exogenous' or 'conditional', got {self.config.prior!r}")
        conditional = self.config.prior == "conditional"
        cfg, dims, stages = self.config, self.spatial_dims, self.stages
        mid = [s.width // cfg.bottleneck for s in stages]

        n_enc = sum(s.enc_blocks for s in stages)
        self.stem = conv(dims, 1, stages[0].width, 7 if dims == 2 else 5)
        self.enc_stages = nn.ModuleList(
            nn.ModuleList(
                Block(dims, s.width, m, s.width, cfg.block, s.kernel, residual=True, last_scale=1.0 / math.sqrt(n_enc))
                for _ in range(s.enc_blocks)
            )
            for s, m in zip(stages, mid)
        )
        self.enc_transitions = nn.ModuleList(conv(dims, a.width, b.width, 1) for a, b in itertools.pairwise(stages))

        mapped = parent_map_stages(cfg, stages)
        n_dec = sum(s.dec_blocks for s in stages)
        self.dec_stages = nn.ModuleList(
            nn.ModuleList(
                DecoderBlock(
                    dims,
                    s.width,
                    m,
                    cfg.z_dim,
                    num_parents,
                    cfg.block,
                    s.kernel,
                    s.stochastic,
                    n_dec,
                    conditional,
                    s.size if s in mapped else None,
                )
                for _ in range(s.dec_blocks)
            )
            for s, m in zip(stages, mid)
        )
        self.dec_transitions = nn.ModuleList(conv(dims, b.width, a.width, 1) for a, b in itertools.pairwise(stages))
        self.prior_transitions = nn.ModuleList(conv(dims, b.width, a.width, 1) for a, b in itertools.pairwise(stages))
        self.biases = nn.ParameterDict(
            {
                str(i): nn.Parameter(torch.zeros(1, s.width, *s.size))
                for i, s in enumerate(stages)
                if s.bias or i == len(stages) - 1
            }
        )
        self.head_loc = conv(dims, stages[0].width, 1, 1)
        self.head_logscale = conv(dims, stages[0].width, 1, 1)
        if cfg.std_init > 0:
            with torch.no_grad():
                self.head_logscale.weight.zero_()
                assert self.head_logscale.bias is not None  # conv() always has a bias
                self.head_logscale.bias.fill_(math.log(cfg.std_init))
        self.num_latents = sum(s.dec_blocks for s in stages if s.stochastic)
        self._last_stochastic_stage = min(i for i, s in enumerate(stages) if s.stochastic)

    # -- bookkeeping ---------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> str:
        """One line: preset, stages (size x width, blocks), latents and parameter count."""
        stages = ", ".join(f"{'x'.join(map(str, s.size))}:{s.width}{'z' if s.stochastic else ''}" for s in self.stages)
        return (
            f"hvae preset {self.config.preset}, {self.spatial_dims}D stages [{stages}], "
            f"{self.num_latents} latent blocks of {self.config.z_dim} channels, {self.num_parameters():,} parameters"
        )

    # -- networks ------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor | None, pa: torch.Tensor) -> None:
        if pa.dim() != 2 or pa.shape[1] != self.num_parents:
            raise ValueError(f"parents must be (B, {self.num_parents}), got {tuple(pa.shape)}")
        if x is not None and (x.dim() != self.spatial_dims + 2 or x.shape[1] != 1 or tuple(x.shape[2:]) != self.shape):
            raise ValueError(f"image must be (B, 1, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up pass: the last activation of every stage, full resolution first."""
        h = self.stem(x)
        acts = []
        for i, blocks in enumerate(self.enc_stages):
            for block in cast(nn.ModuleList, blocks):
                h = block(h)
            acts.append(h)
            if i < len(self.stages) - 1:
                factors = tuple(a // b for a, b in zip(self.stages[i].size, self.stages[i + 1].size))
                h = self.enc_transitions[i](avg_pool(h, factors))
        return acts

    @overload
    def _decode(
        self,
        pa: torch.Tensor,
        acts: list[torch.Tensor] | None = ...,
        latents: Latents | None = ...,
        temperature: float = ...,
        latents_only: Literal[False] = ...,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]: ...

    @overload
    def _decode(
        self,
        pa: torch.Tensor,
        acts: list[torch.Tensor] | None = ...,
        latents: Latents | None = ...,
        temperature: float = ...,
        *,
        latents_only: Literal[True],
    ) -> tuple[None, list[torch.Tensor], list[torch.Tensor]]: ...

    def _decode(
        self,
        pa: torch.Tensor,
        acts: list[torch.Tensor] | None = None,
        latents: Latents | None = None,
        temperature: float = 1.0,
        latents_only: bool = False,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """Top-down pass. Returns (final state or None when ``latents_only``, z per stochastic
        block, KL (B,) per stochastic block when ``acts`` is given and z is not fixed)."""
        if latents is not None and len(latents) != self.num_latents:
            raise ValueError(f"expected {self.num_latents} latent tensors, got {len(latents)}")
        top = len(self.stages) - 1
        h = self.biases[str(top)].expand(pa.shape[0], *self.biases[str(top)].shape[1:])
        p = h
        zs: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []
        for i in range(top, -1, -1):
            if i < top:
                size = self.stages[i].size
                h = F.interpolate(self.dec_transitions[i](h), size=size, mode="nearest")
                p = F.interpolate(self.prior_transitions[i](p), size=size, mode="nearest")
                if str(i) in self.biases:  # into the fresh up-sampled tensors (saved by nothing)
                    h = add_bias(h, self.biases[str(i)])
                    p = add_bias(p, self.biases[str(i)])
            blocks = cast(nn.ModuleList, self.dec_stages[i])
            # the posterior's nonlinearity of this stage's encoder activation, shared by its blocks
            act = (
                cast(DecoderBlock, blocks[0]).activate(acts[i])
                if acts is not None and self.stages[i].stochastic
                else None
            )
            for j, block in enumerate(blocks):
                fixed = latents.z[len(zs)] if (latents is not None and block.stochastic) else None
                last = i == 0 and j == len(blocks) - 1  # nothing reads the prior state after it
                h, p, z, kl = block(h, p, pa, act=act, noise=fixed, temperature=temperature, need_prior=not last)
                if z is not None:  # a stochastic block's noise
                    zs.append(z)
                if kl is not None:
                    kls.append(kl)
            if latents_only and i == self._last_stochastic_stage:
                return None, zs, kls
        return h, zs, kls

    def _likelihood(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclamped loc and floored log-scale (B, 1, *S), computed in float32 under autocast."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            # both 1-channel heads as one 2-channel convolution: one pass over h, forward and backward
            weight = torch.cat([self.head_loc.weight, self.head_logscale.weight])
            bias = torch.cat([self.head_loc.bias, self.head_logscale.bias])  # type: ignore[list-item]
            # GELU and the heads as one op on the CPU kernels; elsewhere the route that
            # benchmarks/head_grad.py times
            if gelu_pointwise_route(h, weight, bias) is not None:
                out = gelu_pointwise(h, weight, bias)
            else:
                out = pointwise_conv(gelu(h), weight, bias)
            loc, logscale = out[:, :1], out[:, 1:].clamp_min(self.config.x_logscale_min)
        return loc, logscale

    # -- Generator protocol --------------------------------------------------------------
    def elbo(self, x: torch.Tensor, pa: torch.Tensor, beta: float | None = None) -> dict[str, torch.Tensor]:
        """Per-pixel terms, batch means: ``loss`` = nll + beta * kl, ``nll``, ``kl``; and
        ``nelbo`` (B,), the per-sample loss. All float32."""
        self._check_inputs(x, pa)
        out, _, _, _ = self._elbo_pass(x, pa, beta)
        return out

    def _elbo_pass(
        self, x: torch.Tensor, pa: torch.Tensor, beta: float | None
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """One posterior pass: (elbo terms, the sampled z per stochastic block, likelihood loc
        and log-scale under ``pa``)."""
        beta = self.config.beta if beta is None else beta
        h, zs, kls = self._decode(pa, acts=self._encode(x))
        loc, logscale = self._likelihood(h)
        pixels = x[0].numel()
        nll = -discretised_gaussian_log_prob(x, loc, logscale).flatten(1).sum(1) / pixels
        kl = torch.stack(kls, dim=1).sum(1) / pixels
        nelbo = nll + beta * kl
        return {"loss": nelbo.mean(), "nll": nll.mean(), "kl": kl.mean(), "nelbo": nelbo}, zs, loc, logscale

    def elbo_counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, beta: float | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(``elbo(x, pa)``, x_cf) from one posterior pass, for fine-tuning: z ~ q(z | x, pa) is
        drawn once and serves both the one-sample ELBO and the abduction, and the likelihood
        under pa comes from the same pass, so only the decode under pa_cf is extra. x_cf is
        :meth:`counterfactual` with one particle. Differentiable."""
        self._check_inputs(x, pa)
        self._check_inputs(None, pa_cf)
        out, zs, loc, logscale = self._elbo_pass(x, pa, beta)
        h_cf, _, _ = self._decode(pa_cf, latents=Latents(tuple(zs)))
        loc_cf, logscale_cf = self._likelihood(h_cf)
        u = (x.float() - loc.clamp(-1.0, 1.0)) / torch.exp(logscale)
        x_cf = (loc_cf.clamp(-1.0, 1.0) + torch.exp(logscale_cf) * u).clamp(-1.0, 1.0)
        return out, x_cf

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> Latents:
        """z ~ q(z | x, pa) at ``temperature`` (one encoder pass; differentiable)."""
        self._check_inputs(x, pa)
        _, zs, _ = self._decode(pa, acts=self._encode(x), temperature=temperature, latents_only=True)
        return Latents(tuple(zs))

    def decode(self, latents: Latents, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Likelihood loc (clamped to [-1, 1]) and scale (B, 1, *S), float32, for fixed latents."""
        self._check_inputs(None, pa)
        h, _, _ = self._decode(pa, latents=latents)
        loc, logscale = self._likelihood(h)
        return loc.clamp(-1.0, 1.0), torch.exp(logscale)

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_cf = clamp(mu* + sigma* (x - mu) / sigma, -1, 1) with z abducted once per particle
        and decoded under pa and pa_cf in one batched pass. With several particles, returns the
        mean over particles and the per-pixel variance (else None). Differentiable."""
        if particles < 1:
            raise ValueError(f"particles must be >= 1, got {particles}")
        self._check_inputs(x, pa)
        self._check_inputs(None, pa_cf)
        b = x.shape[0]
        if particles > 1:
            x, pa, pa_cf = (t.repeat(particles, *([1] * (t.dim() - 1))) for t in (x, pa, pa_cf))
        latents = self.abduct(x, pa)
        loc, scale = self.decode(latents.repeat(2), torch.cat([pa, pa_cf], dim=0))
        n = x.shape[0]
        u = (x.float() - loc[:n]) / scale[:n]
        x_cf = (loc[n:] + scale[n:] * u).clamp(-1.0, 1.0)
        if particles == 1:
            return x_cf, None
        x_cf = x_cf.reshape(particles, b, *x_cf.shape[1:])
        return x_cf.mean(0), x_cf.var(0, unbiased=False)

    def sample(self, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """x from the prior given parents: the likelihood mean, clamped to [-1, 1] (the pixel
        noise only adds grain)."""
        self._check_inputs(None, pa)
        h, _, _ = self._decode(pa, temperature=temperature)
        loc, _ = self._likelihood(h)
        return loc.clamp(-1.0, 1.0)


def build(config: HVAEConfig, info: DatasetInfo) -> HVAE:
    """Factory of the built-in ``hvae`` generator: an HVAE for the dataset's image shape and
    parents (P = number of variables)."""
    if not isinstance(config, HVAEConfig):
        raise ConfigError(f"generator: expected HVAEConfig, got {type(config).__name__}")
    return HVAE(config, tuple(info.shape), len(info.variables))


__all__ = ["HVAE", "PRESETS", "HVAEConfig", "Latents", "Stage", "auto_preset", "build", "plan_stages", "resolve_config"]
