"""Toy generator and segmentor satisfying segcft's Generator and Segmentor protocols.

Both are 2D only (registered with ``dims=(2,)``); image side must be divisible by 4.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from segcft.data.variables import DatasetInfo
from segcft.errors import ConfigError
from segcft_example.configs import ConvSegmentorConfig, CVAEConfig

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _with_parents(h: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, P) parents as constant channels of the (B, C, H, W) map ``h``."""
    return torch.cat([h, pa[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)


class ConditionalVAE(nn.Module):
    """x = g(z, u; pa): one latent map at 1/4 resolution, Gaussian likelihood per pixel."""

    spatial_dims = 2

    def __init__(self, config: CVAEConfig, info: DatasetInfo) -> None:
        super().__init__()
        if info.spatial_dims != 2 or any(s % 4 for s in info.shape):
            raise ConfigError(f"example-cvae needs 2D images with sides divisible by 4, got {info.shape}")
        p, w, z = len(info.variables), config.width, config.z_channels
        self.beta = config.beta
        self.encoder = nn.Sequential(
            nn.Conv2d(1 + p, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * z, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(z + p, w, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Conv2d(w + p, 2, 3, padding=1)
        self.z_shape = (z, info.shape[0] // 4, info.shape[1] // 4)

    def _posterior(self, x: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, logscale = self.encoder(_with_parents(x, pa)).chunk(2, dim=1)
        return loc, logscale.clamp(-8, 4)

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        loc, logscale = self._posterior(x, pa)
        return loc + temperature * logscale.exp() * torch.randn_like(loc)

    def decode(self, latents: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.decoder(_with_parents(latents, pa))
        loc, logscale = self.head(_with_parents(h, pa)).chunk(2, dim=1)
        return torch.tanh(loc), logscale.clamp(min=-5.0).exp()

    def elbo(self, x: torch.Tensor, pa: torch.Tensor) -> dict[str, torch.Tensor]:
        q_loc, q_logscale = self._posterior(x, pa)
        z = q_loc + q_logscale.exp() * torch.randn_like(q_loc)
        loc, scale = self.decode(z, pa)
        pixels = x[0].numel()
        nll = (0.5 * ((x - loc) / scale) ** 2 + scale.log() + _HALF_LOG_2PI).flatten(1).sum(1) / pixels
        kl = (0.5 * (q_loc**2 + (2 * q_logscale).exp()) - q_logscale - 0.5).flatten(1).sum(1) / pixels
        nelbo = nll + self.beta * kl
        return {"loss": nelbo.mean(), "nll": nll.mean(), "kl": kl.mean(), "nelbo": nelbo}

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        draws = []
        for _ in range(particles):
            z = self.abduct(x, pa)
            loc, scale = self.decode(z, pa)
            loc_cf, scale_cf = self.decode(z, pa_cf)
            draws.append((loc_cf + scale_cf * (x - loc) / scale).clamp(-1, 1))
        stacked = torch.stack(draws)
        return stacked.mean(0), (stacked.var(0) if particles > 1 else None)

    def sample(self, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        z = temperature * torch.randn(pa.shape[0], *self.z_shape, device=pa.device, dtype=pa.dtype)
        return self.decode(z, pa)[0]


class ConvSegmentor(nn.Module):
    """3x3 convs at full resolution -> logits (B, C, H, W) over ``info.class_names``."""

    spatial_dims = 2

    def __init__(self, config: ConvSegmentorConfig, info: DatasetInfo) -> None:
        super().__init__()
        if info.spatial_dims != 2:
            raise ConfigError("example-convnet segments 2D images only")
        self.classes = info.class_names
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(config.depth):
            layers += [nn.Conv2d(channels, config.width, 3, padding=1), nn.ReLU()]
            channels = config.width
        layers.append(nn.Conv2d(channels, len(self.classes), 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_generator(config: CVAEConfig, info: DatasetInfo) -> ConditionalVAE:
    """Generator factory segcft calls."""
    return ConditionalVAE(config, info)


def build_segmentor(config: ConvSegmentorConfig, info: DatasetInfo) -> ConvSegmentor:
    """Segmentor factory segcft calls."""
    return ConvSegmentor(config, info)


