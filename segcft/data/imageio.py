"""TIFF images with their physical spacing, read and written the same way wherever segcft
handles image files: the size check on a file's header before anything is decoded (shared with
the ``tiff`` dataset) and ``segcft counterfactual``'s input and output."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from segcft.errors import UserError

__all__ = ["MAX_VOXELS", "ImageTooLarge", "declared_shape", "read_tiff", "write_tiff"]

MAX_VOXELS = 2**28
"""Largest image, mask or region file decoded (1 GiB as float32)."""


class ImageTooLarge(ValueError):
    """A file whose header declares more than MAX_VOXELS voxels (it is never decoded)."""


def declared_shape(tif: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an open ``tifffile.TiffFile``'s first series, from its header alone;
    ValueError when it holds no image, ImageTooLarge when it declares over MAX_VOXELS voxels."""
    if not tif.series or 0 in tif.series[0].shape:
        raise ValueError("no image data")
    series = tif.series[0]
    shape = tuple(int(x) for x in series.shape)
    if math.prod(shape) > MAX_VOXELS:
        raise ImageTooLarge(f"shape {shape} has {math.prod(shape)} voxels, more than the limit of {MAX_VOXELS} (2**28)")
    return shape, np.dtype(series.dtype)


_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}
_IMAGEJ_UNITS = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "m": 1000.0}


def read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Pixels and spacing in mm (slowest axis first) from segcft metadata, ImageJ metadata or
    the resolution tags; None when the file records no physical spacing."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            declared_shape(tif)
            array = tif.asarray()
            ndim = np.squeeze(array).ndim
            shaped = tif.shaped_metadata
            if shaped and isinstance(shaped[0], dict) and "spacing" in shaped[0]:
                sp = tuple(float(s) for s in shaped[0]["spacing"])
                if len(sp) == ndim:
                    return array, sp
            page = tif.pages.first
            tags = page.tags
            ij = tif.imagej_metadata or {}
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            unit_tag = tags.get("ResolutionUnit")
            unit = int(unit_tag.value) if unit_tag is not None else 2
            if unit == 1:
                scale = _IMAGEJ_UNITS.get(str(ij.get("unit", "")).lower())
            else:
                scale = _MM_PER_UNIT.get(unit)
            if xr is None or yr is None or scale is None:
                return array, None
            xs = scale * xr.value[1] / xr.value[0]
            ys = scale * yr.value[1] / yr.value[0]
            if ndim == 2:
                return array, (ys, xs)
            if "spacing" in ij:
                return array, (scale * float(ij["spacing"]), ys, xs)
            return array, None
    except (tifffile.TiffFileError, OSError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{path}: cannot read the TIFF file: {e}") from None


def write_tiff(path: Path, array: np.ndarray, spacing: tuple[float, ...]) -> None:
    """Write ``array`` with its spacing in mm: resolution tags (pixels per cm) for the in-plane
    axes and segcft's JSON metadata for all axes (read back by ``read_tiff``)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    ys, xs = spacing[-2], spacing[-1]
    tifffile.imwrite(
        path,
        array,
        resolution=(10.0 / xs, 10.0 / ys),
        resolutionunit="CENTIMETER",
        photometric="minisblack",
        metadata={"spacing": [float(s) for s in spacing], "unit": "mm"},
    )
