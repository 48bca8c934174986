"""folder_io: the array helpers every dataset-folder format shares.

Part of the public folder layer (import them from ``segcft.data.folder``): ``inside`` keeps file
paths within the dataset folder, ``check_values`` turns a decoded file into checked images,
class masks or region ids, ``window`` maps intensities to [-1, 1] (between ``window_bounds``),
``measure_sample`` measures the structure variables of one mask, ``crop_pad`` and ``resize``
bring an array to the dataset shape and ``uncrop_pad`` undoes a crop or pad (to write an output
back on its input's grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.folder_spec import SPEC_FILE, Spec, class_labels, labels_to_classes


class BadValues(ValueError):
    """A file whose header or values break the contract (``key``: the dataset.yaml key checked, if any)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def inside(root: Path, folder: str, name: str) -> Path:
    """Resolved ``folder/name``; BadValues when it resolves (symlink, ``..``) outside the dataset folder."""
    path = (root / folder / name).resolve()
    if root.resolve() not in path.parents:
        raise BadValues(f"resolves to {path}, outside the dataset folder {root}")
    return path


def check_values(folder: str, arr: np.ndarray, spec: Spec, float_labels: bool = False) -> np.ndarray:
    """Images as finite float32, masks as class indices, regions as declared ids (int64); BadValues otherwise."""
    if folder == "images":
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise BadValues(f"images must be integer or float, got dtype {arr.dtype}")
        with np.errstate(over="ignore"):
            out = arr.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise BadValues(f"image contains NaN or infinite values (as float32), e.g. {arr[at]} at voxel {at}")
        return out
    if float_labels and np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise BadValues(f"{folder} must hold integer labels, got non-integer values of dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise BadValues(f"{folder} must hold integer labels, got dtype {arr.dtype}")
    if folder == "masks":
        try:
            return labels_to_classes(arr, spec.structures)
        except ValueError as exc:
            raise BadValues(str(exc), key="structures") from None
    allowed = np.asarray([0, *sorted(spec.regions)], dtype=np.int64)
    bad_ids = np.unique(arr[~np.isin(arr, allowed)])[:10].tolist()
    if bad_ids:
        raise BadValues(
            f"labels {bad_ids} are not declared in regions of {SPEC_FILE} (declared: {allowed.tolist()})", key="regions"
        )
    return arr.astype(np.int64)


def measure_sample(classes: np.ndarray, regions: np.ndarray | None, spec: Spec, voxel_volume: float) -> list[float]:
    """Physical area/volume of every structure variable (NaN for the others) of one sample's class mask."""
    labels = class_labels(spec.structures).tolist()
    out = []
    for v in spec.variables:
        if v.measure is None:
            out.append(float("nan"))
            continue
        label = {n: k for k, n in spec.structures.items()}[v.measure.structure]
        sel = classes == labels.index(label)
        if v.measure.region is not None:
            rid = {n: k for k, n in spec.regions.items()}[v.measure.region]
            sel &= regions == rid
        out.append(float(sel.sum()) * voxel_volume)
    return out


def window_bounds(
    arr: np.ndarray, fixed: tuple[float, float] | None, percentiles: tuple[float, float] | None
) -> tuple[float, float]:
    """The (lo, hi) intensities ``window`` maps to -1 and 1 for image ``arr``: the fixed window, or
    the image's percentiles (hi > lo); also what writing an output back un-windows with."""
    if fixed is not None:
        return float(fixed[0]), float(fixed[1])
    lo, hi = (float(v) for v in np.percentile(arr.astype(np.float32), percentiles or (0.0, 100.0)))
    return (lo, lo + 1.0) if hi <= lo else (lo, hi)


def window(arr: np.ndarray, spec: Spec) -> np.ndarray:
    """Image intensities mapped to [-1, 1] by the dataset's fixed window or per-image percentiles."""
    a = arr.astype(np.float32)
    lo, hi = window_bounds(a, spec.window, spec.percentiles)
    return np.clip((a - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def crop_pad(t: Any, target: tuple[int, ...], fill: float) -> Any:
    """Tensor ``t`` centre-cropped or padded with ``fill`` to the shape ``target``."""
    import torch

    if tuple(t.shape) == tuple(target):
        return t
    out = torch.full(tuple(target), fill, dtype=t.dtype)
    src, dst = [], []
    for n, m in zip(t.shape, target):
        a = abs(n - m) // 2
        src.append(slice(a, a + m) if n >= m else slice(0, n))
        dst.append(slice(0, m) if n >= m else slice(a, a + n))
    out[tuple(dst)] = t[tuple(src)]
    return out


def uncrop_pad(t: Any, size: tuple[int, ...]) -> Any:
    """The inverse of ``crop_pad`` to ``t.shape`` for an array of shape ``size``: the kept part back
    in place, 0 where the crop cut it (the padding is dropped)."""
    import torch

    out = torch.zeros(tuple(size), dtype=t.dtype)
    src, dst = [], []
    for n, m in zip(size, t.shape):
        a = abs(n - m) // 2
        dst.append(slice(a, a + m) if n >= m else slice(0, n))
        src.append(slice(0, m) if n >= m else slice(a, a + n))
    out[tuple(dst)] = t[tuple(src)]
    return out


def resize(t: Any, target: tuple[int, ...], linear: bool) -> Any:
    """Tensor ``t`` resampled to the shape ``target``: (bi/tri)linear for images (float32 unless
    already floating), nearest for labels (which keep their dtype)."""
    import torch.nn.functional as F

    if tuple(t.shape) == tuple(target):
        return t
    x = (t if t.is_floating_point() else t.float())[None, None] if linear else t[None, None].double()
    if linear:
        mode = "bilinear" if len(target) == 2 else "trilinear"
        return F.interpolate(x, size=tuple(target), mode=mode, align_corners=False)[0, 0]
    return F.interpolate(x, size=tuple(target), mode="nearest-exact")[0, 0].round().to(t.dtype)


def fit_shape(t: Any, target: tuple[int, ...], fit: str, linear: bool, fill: float) -> Any:
    """Tensor ``t`` brought to ``target`` by ``fit``: ``resize`` (see :func:`resize`) or ``crop``
    (centre crop/pad with ``fill``, see :func:`crop_pad`)."""
    return resize(t, target, linear) if fit == "resize" else crop_pad(t, target, fill)
