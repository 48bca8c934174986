"""A tiny run with exact components, for testing evaluation and what-ifs independently of
training: a 16x16 phantom with two structures whose areas are exactly controllable, a
thresholding segmentor that measures them exactly, a linear SCM, and two generators: an oracle
(re-renders the subject with the counterfactual parents) and identity (changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segcft.config import RunConfig
from segcft.data.variables import DatasetInfo, Measure, Variable, fit_normalisation

SHAPE = (16, 16)
SPACING = (2.0, 2.0)  # 4 mm^2 pixels
BLOB_COLS = 10  # blob fills the left 10 columns row by row from the top
VARIABLES = [
    Variable("age", "continuous", (), "years"),
    Variable("blob_area", "continuous", ("age",), "mm^2", Measure("blob")),
    Variable("spot_area", "continuous", (), "mm^2", Measure("spot")),
]
AGE_SLOPE = 2.0  # mm^2 of blob per year


def _subjects(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exogenous (n, 1) background offsets and physical parents (n, 3)."""
    rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[split])
    age = np.clip(50 + 8 * rng.standard_normal(n), 30, 70)
    blob = np.clip(300 + AGE_SLOPE * (age - 50) + 25 * rng.standard_normal(n), 200, 400)
    spot = np.clip(150 + 25 * rng.standard_normal(n), 80, 240)
    exo = rng.uniform(0.0, 0.2, size=(n, 1))
    pa = np.stack([age, blob, spot], axis=1)
    return torch.tensor(exo, dtype=torch.float32), torch.tensor(pa, dtype=torch.float64)


def render(exogenous: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Blob (value 1) in the left columns from the top, spot (0.5) in the right columns from
    the bottom, background -1 + offset; areas rounded to whole pixels."""
    b = parents.shape[0]
    H, W = SHAPE
    px = SPACING[0] * SPACING[1]
    mask = torch.zeros(b, H, W, dtype=torch.int64)
    left = torch.arange(H * BLOB_COLS).reshape(H, BLOB_COLS)
    right = torch.arange(H * (W - BLOB_COLS)).reshape(H, W - BLOB_COLS).flip(0)
    for i in range(b):
        nb = int(torch.round(parents[i, 1].double() / px))
        ns = int(torch.round(parents[i, 2].double() / px))
        mask[i, :, :BLOB_COLS][left < nb] = 1
        mask[i, :, BLOB_COLS:][right < ns] = 2
    img = (-1.0 + exogenous.float().view(b, 1, 1)).expand(b, H, W).clone()
    img[mask == 1] = 1.0
    img[mask == 2] = 0.5
    return img.unsqueeze(1), mask, None


_TRAIN_EXO, _TRAIN_PA = _subjects("train", 200)
INFO = DatasetInfo(
    name="toy",
    spatial_dims=2,
    shape=SHAPE,
    spacing=SPACING,
    structures={1: "blob", 2: "spot"},
    variables=list(VARIABLES),
    normalisation=fit_normalisation(VARIABLES, _TRAIN_PA.tolist()),
)


class ToyPhantom(torch.utils.data.Dataset):
    """One split of the toy phantom (with ``render``: exact counterfactuals)."""

    def __init__(self, split: str, n: int = 40) -> None:
        self.info = INFO
        self.exo, self.pa = _subjects(split, n)

    def __len__(self) -> int:
        return self.exo.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img, mask, _ = render(self.exo[i : i + 1], self.pa[i : i + 1])
        return {
            "image": img[0],
            "mask": mask[0],
            "parents": self.info.normalise(self.pa[i]).float(),
            "exogenous": self.exo[i],
            "index": torch.tensor(i),
        }

    def render(self, exogenous: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return render(exogenous, parents)


class ThresholdSegmentor(nn.Module):
    """Exact segmentation of the toy images: saturated logits from intensity thresholds."""

    classes = ("background", "blob", "spot")
    spatial_dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0]
        labels = torch.where(v > 0.75, 1, torch.where(v > 0.25, 2, 0))
        return 40.0 * nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()


class LinearSCM(nn.Module):
    """blob_area = 300 + 2 (age - 50) + noise (physical units); age and spot_area are roots."""

    def forward(self, pa: torch.Tensor) -> torch.Tensor:
        return pa

    def counterfactual(self, pa: torch.Tensor, interventions: dict[str, torch.Tensor]) -> torch.Tensor:
        phys = INFO.denormalise(pa.double())
        noise = phys[:, 1] - (300 + AGE_SLOPE * (phys[:, 0] - 50))
        out = phys.clone()
        for name, v in interventions.items():
            j = INFO.index(name)
            out[:, j] = v.double() * INFO.normalisation.std[j] + INFO.normalisation.mean[j]
        if "blob_area" not in interventions:
            out[:, 1] = 300 + AGE_SLOPE * (out[:, 0] - 50) + noise
        return INFO.normalise(out).to(pa.dtype)


def _pixel_noise_counterfactual(
    gen: nn.Module, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x_cf = clamp(mu* + sigma* (x - mu) / sigma, -1, 1) from ``abduct`` and ``decode``."""
    z = gen.abduct(x, pa)
    mu, sigma = gen.decode(z, pa)
    mu_cf, sigma_cf = gen.decode(z, pa_cf)
    x_cf = (mu_cf + sigma_cf * (x - mu) / sigma).clamp(-1.0, 1.0)
    return x_cf, (torch.zeros_like(x) if particles > 1 else None)


class OracleGenerator(nn.Module):
    """The exact counterfactual with the pixel-noise rule (unit scale): the latent is the
    subject's background offset, decode re-renders the subject under the given parents."""

    spatial_dims = 2

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return x[:, 0, 0, -1] + 1.0  # top-right pixel is always background

    def decode(self, latents: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, _, _ = render(latents.unsqueeze(1).cpu(), INFO.denormalise(pa.double()).cpu())
        mu = mu.to(pa.device)
        return mu, torch.ones_like(mu)

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _pixel_noise_counterfactual(self, x, pa, pa_cf, particles)


class IdentityGenerator(nn.Module):
    """Ignores every intervention: the latent is the image itself, decoded unchanged."""

    spatial_dims = 2

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return x.clone()

    def decode(self, latents: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return latents, torch.ones_like(latents)

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _pixel_noise_counterfactual(self, x, pa, pa_cf, particles)


class ZeroRegressor(nn.Module):
    """Predicts the training mean of every variable."""

    spatial_dims = 2

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = x.new_zeros(x.shape[0], len(INFO.variables))
        return {"loc": z, "scale": torch.ones_like(z)}


@dataclass
class ToyRun:
    """The attributes of ``segcft.run.Run`` that evaluation uses."""

    config: RunConfig
    info: DatasetInfo = field(default_factory=lambda: INFO)
    device: str = "cpu"
    mechanisms: nn.Module = field(default_factory=LinearSCM)
    segmentor: nn.Module = field(default_factory=ThresholdSegmentor)
    eval_segmentor: nn.Module = field(default_factory=ThresholdSegmentor)
    regressor: nn.Module = field(default_factory=ZeroRegressor)
    generators: dict[str, nn.Module] = field(
        default_factory=lambda: {"identity": IdentityGenerator(), "oracle": OracleGenerator()}
    )
    eps: float = 0.0
    run_dir: Path | None = None

    def dataset(self, split: str) -> Any:
        return ToyPhantom(split)


def make_toy_run() -> ToyRun:
    cfg = RunConfig()
    cfg.seed = 0
    cfg.evaluate.bootstrap = 200
    cfg.evaluate.dilation = 1
    cfg.cft.batch_size = 8
    return ToyRun(config=cfg)
