"""Soft-area terms of the segmentor-guided objectives (seg, pos-seg; docs/method.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segcft.data.variables import DatasetInfo

__all__ = ["AreaTerms", "area_terms"]


@dataclass(frozen=True)
class AreaTerms:
    """The soft-area terms of a seg/pos-seg objective.

    Term k measures ``index[k] = (class, region or -1)``; its target is the sum of the physical
    counterfactual values of the variables ``members[k]`` and its scale ``scale[k]`` (physical
    units) turns the error into normalised units."""

    index: torch.Tensor  # (K, 2) int64
    scale: torch.Tensor  # (K,) float32
    members: tuple[tuple[int, ...], ...]
    regional: bool

    def targets(self, info: DatasetInfo, pa_norm: torch.Tensor) -> torch.Tensor:
        """(B, P) normalised values -> (B, K) physical targets."""
        phys = info.denormalise(pa_norm.float())
        return torch.stack([phys[:, list(m)].sum(1) for m in self.members], dim=1)

    def measure(self, areas: torch.Tensor) -> torch.Tensor:
        """Pick the terms from ``soft_area`` output (B, C) or (B, C, R) -> (B, K)."""
        cols = []
        for c, r in self.index.tolist():
            if areas.dim() == 2:
                cols.append(areas[:, c])
            else:
                cols.append(areas[:, c].sum(-1) if r < 0 else areas[:, c, r])
        return torch.stack(cols, dim=1)

    def affected(self, changed: torch.Tensor) -> torch.Tensor:
        """(P,) bool of changed variables -> (K,) bool of terms whose target changes."""
        return torch.stack([changed[list(m)].any() for m in self.members])


def area_terms(info: DatasetInfo, regional: bool) -> AreaTerms:
    """Soft-area terms of every structure variable.

    Regional (pos-seg): one term per variable, regional ones at (class, region). Otherwise (seg):
    whole-structure variables at (class, -1); a structure described only by regional variables
    gets one term whose target is their sum (its regions are taken to cover it) and whose scale
    is the root of the summed variances (choice)."""
    rows: list[tuple[int, int]] = []
    scales: list[float] = []
    members: list[tuple[int, ...]] = []
    grouped: dict[int, list[int]] = {}
    whole: set[int] = set()
    std = info.normalisation.std
    for v in info.structure_variables:
        assert v.measure is not None
        j = info.index(v.name)
        c = info.class_index(v.measure.structure)
        if v.measure.region is None:
            rows.append((c, -1))
            scales.append(std[j])
            members.append((j,))
            whole.add(c)
        elif regional:
            rows.append((c, info.region_id(v.measure.region)))
            scales.append(std[j])
            members.append((j,))
        else:
            grouped.setdefault(c, []).append(j)
    for c, js in grouped.items():
        if c in whole:
            continue
        rows.append((c, -1))
        scales.append(sum(std[j] ** 2 for j in js) ** 0.5)
        members.append(tuple(js))
    return AreaTerms(
        index=torch.tensor(rows, dtype=torch.int64).reshape(-1, 2),
        scale=torch.tensor(scales, dtype=torch.float32),
        members=tuple(members),
        regional=regional,
    )
