"""The built-in regressor: a small CNN predicting every variable of the dataset from the image
and, with ``condition`` (the default), from the variable's causal parents: q(v | x, pa_v).

Conditioning follows causal-gen's anti-causal predictors and is how Reg-CFT asks the regressor:
given the counterfactual parents. Neither form reads an area from the structure alone: both also
use cues that go with the area in the training images (the thorax's outline and brightness), which
an intervention on the area leaves unchanged, so on cxr-phantom's exact counterfactuals their
predicted areas follow the true change with slopes of 0.5-0.8 (benchmarks/REPRODUCTION.md,
"Regressor probe" and after). Continuous variables get a Gaussian (loc, scale) in normalised
units, binary ones a Bernoulli logit. GroupNorm only: the frozen regressor used during
fine-tuning behaves the same whatever the batch, because it never depends on batch statistics.
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
    cond: torch.Tensor  # (P, P) bool buffer: which parent columns each head reads

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
        self.grid = int(config.grid)
        self.variables: tuple[str, ...] = tuple(info.variable_names)
        self.min_scale = float(config.min_scale)
        self.beta = float(config.beta)
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
        names = self.variables
        cond = torch.zeros(len(names), len(names), dtype=torch.bool)
        if config.condition:
            for j, v in enumerate(info.variables):
                for p in v.parents:
                    cond[j, names.index(p)] = True
        self.register_buffer("cond", cond, persistent=False)  # (P, P): head j reads parent column k
        self.order = [names.index(n) for n in info.topological_order()]
        features = sum(widths) * config.grid**info.spatial_dims + len(names)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(features, widths[-1]), nn.SiLU(), nn.Dropout(config.dropout), nn.Linear(widths[-1], 2)
            )
            for _ in names
        )

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Image (B, 1, *S) and normalised parents (B, P) -> {"loc": (B, P), "scale": (B, P)}.

        Head j reads the columns of ``parents`` that are variable j's causal parents. Without
        ``parents``, each head is conditioned on the regressor's own point estimates of its
        parents, predicted first (topological order)."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"expected an image batch (B, 1, *S) with {self.spatial_dims} spatial axes, got {tuple(x.shape)}"
            )
        if parents is not None and parents.shape != (x.shape[0], len(self.variables)):
            raise ValueError(
                f"parents must be (B, {len(self.variables)}) in the order {list(self.variables)}, "
                f"got {tuple(parents.shape)}"
            )
        h = self._features(x)
        known = None if parents is None else parents.to(h.dtype)
        values = h.new_zeros(x.shape[0], len(self.variables))
        outs: list[torch.Tensor] = [h.new_zeros(())] * len(self.variables)
        for j in self.order:
            given = (known if known is not None else values) * self.cond[j].to(h.dtype)
            outs[j] = self.heads[j](torch.cat([h, given], dim=1)).float()
            if known is None:
                loc_j = outs[j][:, 0]
                values = values.clone()
                values[:, j] = torch.sigmoid(loc_j) if bool(self.binary[j]) else loc_j
        loc, raw_scale = torch.stack(outs, dim=1).unbind(2)
        scale = torch.where(self.binary, torch.ones_like(raw_scale), F.softplus(raw_scale) + self.min_scale)
        return {"loc": loc, "scale": scale}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum(widths) * grid^dims): the means of the stem's and every stage's features over
        each cell of a grid. The fine stages' means count pixels of local patterns (an area is
        such a count), the cells say where (left or right lung), the coarse stages carry context."""
        pool = F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d
        h = self.stem(x)
        pooled = [pool(h, self.grid).flatten(1)]
        for block in self.blocks:
            h = block(h)
            pooled.append(pool(h, self.grid).flatten(1))
        return torch.cat(pooled, dim=1)

    def nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-variable negative log-likelihood (B, P) of normalised targets: Gaussian for
        continuous columns, Bernoulli cross-entropy with logits for binary ones (targets may be
        soft probabilities). Each variable is conditioned on its parents' values in ``targets``."""
        if targets.dim() != 2 or targets.shape != (x.shape[0], len(self.variables)):
            raise ValueError(
                f"targets must be (B, {len(self.variables)}) in the order {list(self.variables)}, "
                f"got {tuple(targets.shape)}"
            )
        return self._nll(self(x, targets), targets)

    def _nll(self, out: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(out["loc"].dtype)
        z = (targets - out["loc"]) / out["scale"]
        gaussian = 0.5 * z * z + torch.log(out["scale"]) + _LOG_SQRT_2PI
        bernoulli = F.binary_cross_entropy_with_logits(out["loc"], targets.clamp(0, 1), reduction="none")
        return torch.where(self.binary, bernoulli, gaussian)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss (B, P): the nll, with each continuous column weighted by
        sg(scale)^(2 beta) (beta-NLL, Seitzer et al. 2022). With beta = 1 every mean gets the
        gradient of a squared error whatever its predicted scale; a plain nll would weight each
        head by 1/scale^2 and let the surest variable (on the phantoms body size, read from the
        thorax outline) steer the shared features away from the structures."""
        out = self(x, targets)
        nll = self._nll(out, targets)
        weight = torch.where(self.binary, torch.ones_like(out["scale"]), out["scale"].detach() ** (2 * self.beta))
        return nll * weight

    def predict(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        """Point estimates (B, P): the Gaussian mean (normalised) or the probability of 1."""
        loc = self(x, parents)["loc"]
        return torch.where(self.binary, torch.sigmoid(loc), loc)


def build(config: CNNRegressorConfig, info: DatasetInfo) -> CNNRegressor:
    """Factory registered as the ``cnn`` regressor."""
    return CNNRegressor(config, info)
