"""The built-in regressor: a small CNN predicting every variable of the dataset from the image.

Continuous variables get a Gaussian (loc, scale) in normalised units, binary ones a Bernoulli
logit. GroupNorm only: the frozen regressor used during fine-tuning behaves the same whatever
the batch, because it never depends on batch statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segcft.data.variables import DatasetInfo
from segcft.errors import ConfigError
from segcft.models.configs import CNNRegressorConfig

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class _Block(nn.Module):
    """conv(stride) - GroupNorm - SiLU - conv - GroupNorm, plus a projected shortcut, then SiLU."""

    def __init__(self, conv: type[nn.Module], c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            conv(c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(groups, c_out),
        )
        self.skip = conv(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.body(x) + self.skip(x))


class CNNRegressor(nn.Module):
    """Regressor protocol: ``forward(x) -> {"loc", "scale"}`` (B, P) in the dataset's variable
    order and normalisation; binary columns hold logits in ``loc`` and 1 in ``scale``."""

    binary: torch.Tensor  # (P,) bool buffer: which variables are binary

    def __init__(self, config: CNNRegressorConfig, info: DatasetInfo) -> None:
        super().__init__()
        if info.spatial_dims not in (2, 3):
            raise ConfigError(
                f"the cnn regressor supports 2D and 3D data, dataset {info.name!r} is {info.spatial_dims}D"
            )
        if config.width < 1 or config.depth < 1 or config.max_width < config.width:
            raise ConfigError(
                "regressor.params needs width >= 1, depth >= 1 and max_width >= width, got "
                f"width={config.width}, depth={config.depth}, max_width={config.max_width}"
            )
        widths = [min(config.width * 2**i, config.max_width) for i in range(config.depth + 1)]
        if config.groups < 1 or any(w % config.groups for w in widths):
            raise ConfigError(f"regressor.params.groups={config.groups} must divide every width {widths}")
        if not 0.0 <= config.dropout < 1.0 or config.min_scale <= 0:
            raise ConfigError(
                "regressor.params needs dropout in [0, 1) and min_scale > 0, "
                f"got {config.dropout} and {config.min_scale}"
            )
        self.spatial_dims: int = info.spatial_dims
        self.variables: tuple[str, ...] = tuple(info.variable_names)
        self.min_scale = float(config.min_scale)
        self.register_buffer(
            "binary", torch.tensor([v.type == "binary" for v in info.variables], dtype=torch.bool), persistent=False
        )
        conv = nn.Conv2d if info.spatial_dims == 2 else nn.Conv3d
        self.stem = nn.Sequential(
            conv(1, widths[0], 3, padding=1, bias=False), nn.GroupNorm(config.groups, widths[0]), nn.SiLU()
        )
        self.blocks = nn.Sequential(
            *[_Block(conv, widths[i], widths[i + 1], 2, config.groups) for i in range(config.depth)]
        )
        self.head = nn.Sequential(
            nn.Linear(widths[-1], widths[-1]),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(widths[-1], 2 * len(self.variables)),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image (B, 1, *S) -> {"loc": (B, P), "scale": (B, P)}."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"expected an image batch (B, 1, *S) with {self.spatial_dims} spatial axes, got {tuple(x.shape)}"
            )
        h = self.blocks(self.stem(x)).flatten(2).mean(2)
        loc, raw_scale = self.head(h).float().chunk(2, dim=1)
        scale = torch.where(self.binary, torch.ones_like(raw_scale), F.softplus(raw_scale) + self.min_scale)
        return {"loc": loc, "scale": scale}

    def nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-variable negative log-likelihood (B, P) of normalised targets: Gaussian for
        continuous columns, Bernoulli cross-entropy with logits for binary ones (targets may be
        soft probabilities)."""
        out = self(x)
        if targets.shape != out["loc"].shape:
            raise ValueError(
                f"targets must be (B, {len(self.variables)}) in the order {list(self.variables)}, "
                f"got {tuple(targets.shape)}"
            )
        targets = targets.to(out["loc"].dtype)
        z = (targets - out["loc"]) / out["scale"]
        gaussian = 0.5 * z * z + torch.log(out["scale"]) + _LOG_SQRT_2PI
        bernoulli = F.binary_cross_entropy_with_logits(out["loc"], targets.clamp(0, 1), reduction="none")
        return torch.where(self.binary, bernoulli, gaussian)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Point estimates (B, P): the Gaussian mean (normalised) or the probability of 1."""
        loc = self(x)["loc"]
        return torch.where(self.binary, torch.sigmoid(loc), loc)


def build(config: CNNRegressorConfig, info: DatasetInfo) -> CNNRegressor:
    """Factory registered as the ``cnn`` regressor."""
    return CNNRegressor(config, info)
