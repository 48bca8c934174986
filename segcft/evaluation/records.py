"""Typed score records of an evaluation (docs/method.md section 6): one frozen key per measure,
the per-sample values each key collects over batches, their bootstrap summary and its text.

The loop adds values under these keys (:class:`Scores`), ``report.summarise`` reads them back
with the same keys, so a measure is named once and the two sides cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import numpy as np
import torch

from segcft.metrics import bootstrap_mean, bootstrap_ratio

__all__ = [
    "AreaError",
    "Bootstrap",
    "Change",
    "Composition",
    "ExactError",
    "Floor",
    "Leakage",
    "Reversibility",
    "ScoreKey",
    "Scores",
    "fmt",
    "get",
]

Summary = dict[str, float]
"""``{"mean", "lo", "hi", "n"}``: a mean with its 95% bootstrap interval over subjects."""


class ScoreKey:
    """Base of the score keys: one frozen (hashable) dataclass per measure."""


@dataclass(frozen=True)
class Floor(ScoreKey):
    """Measurement floor: a segmentor's area of ``structure`` on the factual image against the
    recorded value; ``stat`` is ``ae`` (absolute error) or ``ape`` (absolute percentage error)."""

    structure: str
    who: str
    stat: str


@dataclass(frozen=True)
class AreaError(ScoreKey):
    """Area of ``structure`` measured by ``who`` on the counterfactual of do(``variable``) made
    by ``source`` (a mode, or ``ref:<name>`` for a reference image), against its counterfactual
    value: effectiveness when ``structure == variable``, per-variable leakage otherwise."""

    variable: str
    source: str
    who: str
    structure: str
    stat: str


@dataclass(frozen=True)
class Leakage(ScoreKey):
    """Mean percentage error of the structures other than ``variable`` (per subject)."""

    variable: str
    source: str
    who: str


@dataclass(frozen=True)
class Change(ScoreKey):
    """Locality: mean |x_cf - x| (0-255) ``outside`` or ``inside`` the dilated structure, or
    ``outside_region`` (outside the variable's dilated region)."""

    variable: str
    mode: str
    where: str


@dataclass(frozen=True)
class ExactError(ScoreKey):
    """Phantoms: mean |x_cf - exact counterfactual| (0-255) over ``all`` voxels or ``outside``
    the dilated structure."""

    variable: str
    mode: str
    where: str


@dataclass(frozen=True)
class Composition(ScoreKey):
    """Mean |x_m - x| (0-255) after ``cycle`` null interventions in a row."""

    mode: str
    cycle: int


@dataclass(frozen=True)
class Reversibility(ScoreKey):
    """Mean |x - x_back| (0-255): do(variable) then back to the factual parents."""

    variable: str
    mode: str


class Scores:
    """Per-sample values of every measure, concatenated over batches (float64, CPU)."""

    def __init__(self) -> None:
        self._values: dict[ScoreKey, list[torch.Tensor]] = {}

    def add(self, key: ScoreKey, values: torch.Tensor) -> None:
        self._values.setdefault(key, []).append(values.detach().double().cpu().reshape(-1))

    def get(self, key: ScoreKey) -> np.ndarray | None:
        """All values of ``key``; None when the measure was never taken."""
        vals = self._values.get(key)
        return None if vals is None else torch.cat(vals).numpy()


@dataclass(frozen=True)
class Bootstrap:
    """Summaries with the same resamples (``seed``) for every measure."""

    scores: Scores
    resamples: int
    seed: int

    def mean(self, key: ScoreKey) -> Summary | None:
        v = self.scores.get(key)
        return None if v is None else bootstrap_mean(v, self.resamples, self.seed)

    def ratio(self, num: ScoreKey, den: ScoreKey) -> Summary:
        """Ratio of means with a paired interval (see ``segcft.metrics.bootstrap_ratio``)."""
        return bootstrap_ratio(self.scores.get(num), self.scores.get(den), self.resamples, self.seed)  # type: ignore[arg-type]

    def errors(self, key: Floor | AreaError) -> dict[str, Summary | None]:
        """``{"mae", "mape"}`` of an area measure."""
        return {"mae": self.mean(replace(key, stat="ae")), "mape": self.mean(replace(key, stat="ape"))}


def finite(v: Any) -> TypeGuard[float]:
    """Whether ``v`` is a finite number (summaries hold None or NaN where undefined)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def fmt(ci: Mapping[str, float] | None, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a bootstrap summary; an en dash when undefined."""
    if not ci or ci.get("mean") is None or not finite(ci["mean"]):
        return "–"
    m, lo, hi = ci["mean"], ci.get("lo"), ci.get("hi")
    if not (finite(lo) and finite(hi)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def get(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``; None where the path does not exist (summaries are sparse)."""
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d
