"""example-blobs: a toy 2D phantom with exact counterfactuals.

Per subject (all draws from ``numpy.random.default_rng([seed, split, index])``):
  intensity ~ U(0.2, 1.0)                                    (root, arbitrary units)
  blob_area = 120 (1 + 0.5 (intensity - 0.6)) exp(0.2 e), e ~ N(0, 1)     (mm^2, 1 mm pixels)
  exogenous = (centre_y, centre_x, noise_seed)
The image is a disc of radius sqrt(blob_area / pi) around the centre, filled with the
intensity, on a background of -0.8 plus Gaussian pixel noise (sd 0.05) drawn from noise_seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from segcft.data.variables import DatasetInfo, Measure, Variable, fit_normalisation
from segcft.errors import ConfigError
from segcft_example.configs import BlobsConfig

SPLITS = ("train", "val", "test")
VARIABLES = [
    Variable("intensity", "continuous", (), "a.u."),
    Variable("blob_area", "continuous", ("intensity",), "mm^2", Measure("blob")),
]


def _population(config: BlobsConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Physical parents (N, 2) and exogenous (N, 3) of one split."""
    n = getattr(config, f"{split}_size")
    parents = np.zeros((n, 2))
    exogenous = np.zeros((n, 3))
    margin = 0.3 * config.size
    for i in range(n):
        rng = np.random.default_rng([config.seed, SPLITS.index(split), i])
        intensity = rng.uniform(0.2, 1.0)
        area = 120.0 * (1 + 0.5 * (intensity - 0.6)) * math.exp(0.2 * rng.normal())
        parents[i] = (intensity, area * (config.size / 32) ** 2)
        exogenous[i] = (*rng.uniform(margin, config.size - margin, size=2), rng.integers(0, 2**31 - 1))
    return parents, exogenous


class BlobsDataset(torch.utils.data.Dataset):
    """Map-style dataset of sample dicts (segcft batch format) with a ``render`` method."""

    def __init__(self, config: BlobsConfig, split: str) -> None:
        self.config = config
        train_parents, _ = _population(config, "train")
        self.info = DatasetInfo(
            name="example-blobs",
            spatial_dims=2,
            shape=(config.size, config.size),
            spacing=(1.0, 1.0),
            structures={1: "blob"},
            variables=list(VARIABLES),
            normalisation=fit_normalisation(VARIABLES, train_parents),
        )
        parents, exogenous = _population(config, split)
        self.parents = torch.tensor(parents, dtype=torch.float32)
        self.exogenous = torch.tensor(exogenous, dtype=torch.float32)
        self.images, self.masks, _ = self.render(self.exogenous, self.parents)

    def __len__(self) -> int:
        return len(self.parents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.images[i],
            "mask": self.masks[i],
            "parents": self.info.normalise(self.parents[i]).float(),
            "exogenous": self.exogenous[i],
            "index": torch.tensor(i, dtype=torch.int64),
        }

    def render(
        self, exogenous: torch.Tensor, parents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(B, 3) exogenous and (B, 2) physical parents -> image (B, 1, H, W), mask (B, H, W), None."""
        s = self.config.size
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        images, masks = [], []
        for (cy, cx, noise_seed), (intensity, area) in zip(exogenous.tolist(), parents.tolist()):
            radius = math.sqrt(max(area, 0.0) / math.pi)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).long()
            noise = torch.randn(s, s, generator=torch.Generator().manual_seed(int(noise_seed)))
            image = torch.where(mask.bool(), torch.tensor(intensity * 0.9), torch.tensor(-0.8)) + 0.05 * noise
            images.append(image.clamp(-1, 1)[None])
            masks.append(mask)
        return torch.stack(images).float(), torch.stack(masks), None


def build(config: BlobsConfig, split: str) -> BlobsDataset:
    """The dataset factory segcft calls (``split`` in train/val/test)."""
    if split not in SPLITS:
        raise ConfigError(f"example-blobs: unknown split {split!r}; expected one of {SPLITS}")
    if not 16 <= config.size <= 128:
        raise ConfigError(f"example-blobs: size must be in [16, 128], got {config.size}")
    if min(config.train_size, config.val_size, config.test_size) < 1:
        raise ConfigError("example-blobs: train_size, val_size and test_size must be >= 1")
    return BlobsDataset(config, split)
