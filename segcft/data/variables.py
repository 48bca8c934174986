"""Variables of a causal model and the metadata every dataset declares.

This module is torch-free on import so that plugin registration and the CLI stay fast.
The batch contract (docs/design.md, "Data flow"): ``parents`` is a (B, P) float tensor in the order of
``DatasetInfo.variables``; continuous variables are affinely normalised with statistics of the
training split (``Normalisation``), binary ones are 0/1 and never normalised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

VariableType = Literal["binary", "continuous"]


@dataclass(frozen=True)
class Measure:
    """What a structure variable measures: the soft area/volume of one segmentor class,
    optionally restricted to one region (Pos-Seg-CFT)."""

    structure: str
    region: str | None = None


@dataclass(frozen=True)
class Variable:
    """One scalar variable of the SCM: its type, its parents (names) and its unit.

    ``measure`` is set for structure variables (areas in mm^2 in 2D, volumes in mm^3 in 3D)."""

    name: str
    type: VariableType
    parents: tuple[str, ...] = ()
    unit: str = ""
    measure: Measure | None = None

    @property
    def is_structure(self) -> bool:
        return self.measure is not None


@dataclass(frozen=True)
class Normalisation:
    """Per-variable affine normalisation ``(value - mean) / std`` computed on the training split
    and stored with the run. Binary variables carry mean 0, std 1 (identity).

    Affine (not log) on purpose: a structure variable's normalised error is then exactly
    ``(soft_area - target) / std``, which is what the fused ``area_loss`` op computes."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[float]]) -> Normalisation:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


def fit_normalisation(variables: Sequence[Variable], rows: Iterable[Sequence[float]]) -> Normalisation:
    """Mean and std (population, floored at 1e-6 of |mean| or 1e-8) of each continuous variable."""
    rows = [list(map(float, r)) for r in rows]
    if not rows:
        raise ValueError("cannot fit a normalisation on an empty training split")
    n = len(rows)
    mean, std = [], []
    for j, var in enumerate(variables):
        if var.type == "binary":
            mean.append(0.0)
            std.append(1.0)
            continue
        col = [r[j] for r in rows]
        m = sum(col) / n
        s = (sum((c - m) ** 2 for c in col) / n) ** 0.5
        mean.append(m)
        std.append(max(s, 1e-6 * abs(m), 1e-8))
    return Normalisation(tuple(mean), tuple(std))


MAX_REGION_ID = 4095
"""Largest region id: the kernels measure per class x region and accept at most 4096 regions
(``segcft.ops`` MAX_REGIONS), ids 0..4095."""


@dataclass
class DatasetInfo:
    """Metadata of a dataset: geometry, label names, region names and the causal graph.

    ``structures`` maps label id (>= 1; 0 is background) to name, ``regions`` maps region id to
    name (id 0 is "outside every region" when regions exist). Spatial axes and spacing are
    slowest first: (H, W) in 2D, (D, H, W) in 3D, spacing in mm."""

    name: str
    spatial_dims: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    structures: dict[int, str]
    variables: list[Variable]
    normalisation: Normalisation
    regions: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.shape) != self.spatial_dims or len(self.spacing) != self.spatial_dims:
            raise ValueError(
                f"dataset {self.name!r}: shape {self.shape} and spacing {self.spacing} must have "
                f"{self.spatial_dims} entries (spatial_dims)"
            )
        names = [v.name for v in self.variables]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name!r}: duplicate variable names in {names}")
        if len(self.normalisation.mean) != len(self.variables):
            raise ValueError(f"dataset {self.name!r}: normalisation has the wrong length")
        bad = [k for k in self.regions if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_REGION_ID]
        if bad:
            raise ValueError(f"dataset {self.name!r}: region ids must be integers in [0, {MAX_REGION_ID}], got {bad}")
        self.topological_order()  # validates the DAG

    # -- geometry -------------------------------------------------------------------------
    @property
    def voxel_size(self) -> float:
        """Area (mm^2) or volume (mm^3) of one pixel/voxel."""
        v = 1.0
        for s in self.spacing:
            v *= s
        return v

    @property
    def class_names(self) -> tuple[str, ...]:
        """Segmentation class names, index 0 is background, then labels in increasing order."""
        return ("background", *tuple(self.structures[k] for k in sorted(self.structures)))

    @property
    def num_regions(self) -> int:
        """R for ``soft_area(..., num_regions=R)``: region ids are in [0, R)."""
        return (max(self.regions) + 1) if self.regions else 0

    def class_index(self, structure: str) -> int:
        """Channel index of a structure in segmentor logits (``class_names`` order)."""
        try:
            return self.class_names.index(structure)
        except ValueError:
            raise KeyError(
                f"dataset {self.name!r} has no structure {structure!r}; known: {list(self.structures.values())}"
            ) from None

    def region_id(self, region: str) -> int:
        for k, v in self.regions.items():
            if v == region:
                return k
        raise KeyError(f"dataset {self.name!r} has no region {region!r}; known: {list(self.regions.values())}")

    # -- variables ------------------------------------------------------------------------
    @property
    def variable_names(self) -> list[str]:
        return [v.name for v in self.variables]

    def index(self, name: str) -> int:
        try:
            return self.variable_names.index(name)
        except ValueError:
            raise KeyError(f"dataset {self.name!r} has no variable {name!r}; known: {self.variable_names}") from None

    def variable(self, name: str) -> Variable:
        return self.variables[self.index(name)]

    @property
    def structure_variables(self) -> list[Variable]:
        return [v for v in self.variables if v.is_structure]

    @property
    def subject_variables(self) -> list[Variable]:
        """Variables that are not structure measurements (e.g. sex, age, contrast)."""
        return [v for v in self.variables if not v.is_structure]

    def topological_order(self) -> list[str]:
        """Variable names parents-first (stable: dataset order among ready nodes).

        Raises ValueError naming the unknown parent or the variables on a cycle."""
        names = self.variable_names
        for v in self.variables:
            for p in v.parents:
                if p not in names:
                    raise ValueError(f"dataset {self.name!r}: variable {v.name!r} has unknown parent {p!r}")
        done: list[str] = []
        remaining = list(self.variables)
        while remaining:
            ready = [v for v in remaining if all(p in done for p in v.parents)]
            if not ready:
                raise ValueError(f"dataset {self.name!r}: the variables {[v.name for v in remaining]} form a cycle")
            for v in ready:
                done.append(v.name)
            remaining = [v for v in remaining if v.name not in done]
        return done

    def descendants(self, name: str) -> set[str]:
        """All variables downstream of ``name`` (excluding itself)."""
        self.index(name)
        out: set[str] = set()
        frontier = [name]
        while frontier:
            cur = frontier.pop()
            for v in self.variables:
                if cur in v.parents and v.name not in out:
                    out.add(v.name)
                    frontier.append(v.name)
        return out

    # -- normalisation (tensor or array in, same type out) -----------------------------------
    def normalise(self, values: Any) -> Any:
        """Physical values (..., P) -> normalised values (..., P)."""
        mean, std = self._stats_like(values)
        return (values - mean) / std

    def denormalise(self, values: Any) -> Any:
        """Normalised values (..., P) -> physical values (..., P)."""
        mean, std = self._stats_like(values)
        return values * std + mean

    def _stats_like(self, values: Any) -> tuple[Any, Any]:
        mean, std = self.normalisation.mean, self.normalisation.std
        if hasattr(values, "new_tensor"):  # torch.Tensor
            return values.new_tensor(mean), values.new_tensor(std)
        import numpy as np

        return np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)

    # -- storage ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON safe), stored with every run."""
        return {
            "name": self.name,
            "spatial_dims": self.spatial_dims,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "structures": {int(k): v for k, v in self.structures.items()},
            "regions": {int(k): v for k, v in self.regions.items()},
            "variables": [
                {
                    "name": v.name,
                    "type": v.type,
                    "parents": list(v.parents),
                    "unit": v.unit,
                    "measure": None
                    if v.measure is None
                    else {"structure": v.measure.structure, "region": v.measure.region},
                }
                for v in self.variables
            ],
            "normalisation": self.normalisation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        variables = [
            Variable(
                name=v["name"],
                type=v["type"],
                parents=tuple(v.get("parents", ())),
                unit=v.get("unit", ""),
                measure=None
                if not v.get("measure")
                else Measure(v["measure"]["structure"], v["measure"].get("region")),
            )
            for v in d["variables"]
        ]
        return cls(
            name=d["name"],
            spatial_dims=int(d["spatial_dims"]),
            shape=tuple(int(s) for s in d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            structures={int(k): v for k, v in d["structures"].items()},
            regions={int(k): v for k, v in (d.get("regions") or {}).items()},
            variables=variables,
            normalisation=Normalisation.from_dict(d["normalisation"]),
        )


def read_dataset_info(path: str | Path) -> DatasetInfo:
    """The DatasetInfo stored in a run's ``dataset.json``; DatasetError naming the file when it
    is missing, not UTF-8 JSON or lacks a key, so a damaged run folder fails in one line."""
    from segcft.errors import DatasetError

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: missing (every run folder stores its dataset metadata there; rerun training)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable or truncated JSON ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object of dataset metadata, got {type(data).__name__}")
    try:
        return DatasetInfo.from_dict(data)
    except KeyError as exc:
        raise DatasetError(f"{path}: missing key {exc.args[0]!r} in the dataset metadata") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path}: invalid dataset metadata ({' '.join(str(exc).split())})") from exc
