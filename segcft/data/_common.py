"""Shared machinery of the phantom datasets: counter-based random numbers, exact-size masks,
smooth texture fields and the map-style dataset that renders samples in batches.

Randomness is counter-based (a splitmix64 hash of seed, split, index and stream), so sample i of
a split is the same whatever order or batch it is drawn in, in any DataLoader worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from segcft.data.variables import DatasetInfo

SPLITS: tuple[str, ...] = ("train", "val", "test")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def check_split(split: str) -> int:
    """Index of ``split`` in (train, val, test); ValueError for anything else."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return SPLITS.index(split)


def check_ranges(name: str, config: Any, bounds: dict[str, tuple[int, int]]) -> None:
    """Raise ConfigError naming the first config field outside its [lo, hi] bounds; split sizes
    (train_size, val_size, test_size) must be >= 1."""
    from segcft.errors import ConfigError

    for key, (lo, hi) in bounds.items():
        value = getattr(config, key)
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: {key} must be in [{lo}, {hi}], got {value}")
    for split in ("train", "val", "test"):
        if getattr(config, f"{split}_size") < 1:
            raise ConfigError(f"{name}: {split}_size must be >= 1")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, split: int, index: np.ndarray, streams: int) -> np.ndarray:
    """(N, streams) float64 uniforms in (0, 1), a pure function of (seed, split, index, stream)."""
    index = np.asarray(index, dtype=np.uint64).reshape(-1, 1)
    stream = np.arange(streams, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(3) + np.uint64(split))
        h = _splitmix64(_splitmix64(key ^ index) + stream * np.uint64(0x632BE59BD9B4E019))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normals(u: np.ndarray) -> np.ndarray:
    """Standard normals from uniforms in (0, 1) (inverse CDF, float64)."""
    return torch.special.ndtri(torch.from_numpy(np.asarray(u, dtype=np.float64))).numpy()


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-style 32-bit integer hash on int64 tensors holding values in [0, 2^32)."""
    m = 0xFFFFFFFF
    state = (x * 747796405 + 2891336453) & m
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & m
    return (word >> 22) ^ word


def seed_ints(u: torch.Tensor) -> torch.Tensor:
    """Float seeds in [0, 1) (as stored in ``exogenous``) -> int64 seeds in [0, 2^24)."""
    return torch.floor(u.double() * 2.0**24).long()


def hashed_uniform(seed: torch.Tensor, count: int, salt: int = 0) -> torch.Tensor:
    """(B, count) float32 uniforms in [0, 1) from per-sample int seeds (B,), vectorised."""
    idx = torch.arange(count, dtype=torch.int64) + (salt << 24)
    h = pcg_hash((pcg_hash(seed.view(-1, 1) & 0xFFFFFFFF) ^ pcg_hash(idx.view(1, -1))) & 0xFFFFFFFF)
    return h.float() * 2.0**-32


def pixel_noise(seed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, *shape) standard normal white noise: Box-Muller on the two 16-bit halves of one
    32-bit hash per pixel."""
    n = int(np.prod(shape))
    idx = torch.arange(n, dtype=torch.int64) + (1 << 24)
    h = pcg_hash((pcg_hash(seed.view(-1, 1) & 0xFFFFFFFF) ^ pcg_hash(idx.view(1, -1))) & 0xFFFFFFFF)
    u1 = ((h >> 16).float() + 0.5) * 2.0**-16
    u2 = (h & 0xFFFF).float() * 2.0**-16
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.view(seed.shape[0], *shape)


def smooth_field(seed: torch.Tensor, shape: Sequence[int], grids: Sequence[int], salt: int = 0) -> torch.Tensor:
    """(B, *shape) smooth random field with unit-ish std: hashed values on coarse grids of
    ``grids`` cells per axis, upsampled (bicubic in 2D, trilinear in 3D) and summed."""
    b, dims = seed.shape[0], len(shape)
    mode = "bicubic" if dims == 2 else "trilinear"
    out = torch.zeros(b, 1, *shape)
    for k, g in enumerate(grids):
        coarse_shape = [max(2, min(g, s)) for s in shape]
        n = int(np.prod(coarse_shape))
        coarse = (hashed_uniform(seed, n, salt=salt * 16 + k) - 0.5) * 3.46
        coarse = coarse.view(b, 1, *coarse_shape)
        out += torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)
    return out[:, 0] / len(grids) ** 0.5


def exact_size_mask(field: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, N) selecting the ``counts[b]`` entries of ``field[b]`` (B, N) with the
    smallest values, ties broken by position (entries at +inf are never selected).

    A shape whose membership is ``field < scale`` grows monotonically with ``scale``; picking the
    threshold by rank hits a requested pixel count exactly, so rendered areas match their
    variables to within half a pixel."""
    n = field.shape[1]
    k = torch.minimum(counts.long().clamp(min=0), torch.isfinite(field).sum(1))
    order = torch.argsort(field, dim=1, stable=True)
    take = torch.arange(n).view(1, -1) < k.view(-1, 1)
    return torch.zeros_like(take).scatter_(1, order, take)


class PhantomDataset(torch.utils.data.Dataset):
    """Map-style dataset over one split of a phantom: samples are rendered on demand, in batches
    when the DataLoader asks for several (``__getitems__``)."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        length: int,
        sample: Callable[[int, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
        render: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> None:
        self.info = info
        self.split = split
        self._split_id = check_split(split)
        self._length = int(length)
        self._sample = sample
        self._render = render

    def __len__(self) -> int:
        return self._length

    def subjects(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Exogenous (N, E) and physical parents (N, P) of the given sample indices."""
        return self._sample(self._split_id, np.asarray(indices, dtype=np.int64))

    def render(
        self, exogenous: torch.Tensor, parents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Deterministic renderer: (B, E) exogenous and (B, P) physical parents -> image, mask,
        regions (see ``segcft.protocols.Phantom``)."""
        return self._render(exogenous, parents)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        idx = np.asarray([int(i) for i in indices], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self._length):
            raise IndexError(f"index out of range for a split of {self._length} samples")
        exo, pa = self.subjects(idx)
        image, mask, regions = self._render(exo, pa)
        pa_norm = self.info.normalise(pa.double()).float()
        out = []
        for j, i in enumerate(idx):
            item: dict[str, Any] = {
                "image": image[j],
                "mask": mask[j],
                "parents": pa_norm[j],
                "exogenous": exo[j],
                "index": torch.tensor(int(i), dtype=torch.int64),
            }
            if regions is not None:
                item["regions"] = regions[j]
            out.append(item)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += self._length
        return self.__getitems__([i])[0]
