"""Soft areas of the structure variables from segmentor logits, and their masks: what both the
evaluation loop and the single what-if measure."""

from __future__ import annotations

import math

import torch

from segcft.data.variables import DatasetInfo, Measure, Variable

__all__ = ["Measurer", "measure_words"]


def measure_words(spatial_dims: int) -> tuple[str, str]:
    """What a structure variable's measure is called in human-facing text, and its unit:
    ``("areas", "mm^2")`` for 2D images, ``("volumes", "mm^3")`` for 3D volumes."""
    return ("volumes", "mm^3") if spatial_dims == 3 else ("areas", "mm^2")


class Measurer:
    """Soft areas of every structure variable from segmentor logits, in physical units."""

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.regional = any(v.measure and v.measure.region for v in info.structure_variables)

    def __call__(
        self, logits: torch.Tensor, regions: torch.Tensor | None, spacing: tuple[float, ...] | None = None
    ) -> torch.Tensor:
        """(B, C, *S) logits -> (B, P) float64 areas (NaN for non-structure variables);
        ``spacing`` per spatial axis in mm, default the dataset's."""
        from segcft.ops import soft_area

        info = self.info
        v = tuple(float(s) for s in (info.spacing if spacing is None else spacing))
        whole = soft_area(logits.float(), spacing=v).double()
        regional = None
        if self.regional and regions is not None:
            regional = soft_area(
                logits.float(), spacing=v, regions=regions.long(), num_regions=info.num_regions
            ).double()
        out = torch.full((logits.shape[0], len(info.variables)), math.nan, dtype=torch.float64, device=logits.device)
        for var in info.structure_variables:
            j = info.index(var.name)
            spec = _spec(var)
            c = info.class_index(spec.structure)
            if spec.region is None:
                out[:, j] = whole[:, c]
            elif regional is not None:
                out[:, j] = regional[:, c, info.region_id(spec.region)]
        return out

    def structure_mask(self, var: Variable, labels: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
        """(B, *S) bool mask of a structure variable: its class, restricted to its region."""
        spec = _spec(var)
        m = labels.eq(self.info.class_index(spec.structure))
        if spec.region is not None and regions is not None:
            m = m & regions.eq(self.info.region_id(spec.region))
        return m


def _spec(var: Variable) -> Measure:
    """The measurement of a structure variable (its structure class and optional region)."""
    if var.measure is None:
        raise ValueError(f"{var.name!r} is not a structure variable")
    return var.measure
