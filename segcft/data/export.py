"""export: write samples of any dataset as a dataset folder that ``tiff`` or ``nifti`` loads back.

The folder has the layout of docs/data.md: ``dataset.yaml`` (the dataset's ``DatasetInfo`` as a
spec with an explicit ``spacing``), ``attributes.csv`` (id, split and the physical value of every
variable) and one image, mask and region file per sample. TIFF images hold the dataset's [-1, 1]
intensities with the window ``{min: -1, max: 1}``. NIfTI files are RAS+ volumes whose affine
carries the spacing; images hold HU when the dataset's intensities are a window of HU
(``HU_WINDOWS``), declared as dataset.yaml ``intensity``, so loading maps them back to [-1, 1].
A 2D dataset becomes NIfTI files of one slice (``spatial_dims: 2``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.folder import CSV_FILE, SPEC_FILE, SPLIT_NAMES, class_labels
from segcft.data.variables import DatasetInfo
from segcft.errors import DatasetError, UserError

FORMATS = ("tiff", "nifti")
"""The folder formats ``segcft data export --format`` writes."""

HU_WINDOWS: dict[str, tuple[float, float]] = {"ccta-phantom": (-250.0, 750.0)}
"""Datasets whose [-1, 1] intensities are a window of CT numbers: the HU at -1 and at +1
(the ccta phantom renders ``(HU - 250) / 500``). Their NIfTI export writes HU."""


def split_counts(name: str, n: int, lengths: dict[str, int]) -> dict[str, int]:
    """Samples to export per split, ``n`` in all: 80/10/10 (none to val and test below 3), a split
    too short for its share passing the rest to the others (train first). UserError when the
    splits hold fewer than ``n`` samples or the train split would get none."""
    total = sum(lengths.values())
    if total < n:
        raise UserError(
            f"--n {n}: dataset {name!r} has only {total} samples ({', '.join(f'{s} {k}' for s, k in lengths.items())})"
        )
    val = round(0.1 * n) if n >= 3 else 0
    test = round(0.1 * n) if n >= 3 else 0
    want = {"train": n - val - test, "val": val, "test": test}
    counts = {s: min(want[s], lengths[s]) for s in SPLIT_NAMES}
    for s in SPLIT_NAMES:
        counts[s] += min(n - sum(counts.values()), lengths[s] - counts[s])
    if counts["train"] < 1:
        raise UserError(f"dataset {name!r} has no training samples to export")
    return counts


def spec_of(info: DatasetInfo, intensity: tuple[float, float]) -> dict[str, Any]:
    """The dataset.yaml of ``info``, with the intensity window (file value at -1, at +1)."""
    spec: dict[str, Any] = {
        "name": info.name,
        "spatial_dims": info.spatial_dims,
        "spacing": [float(s) for s in info.spacing],
        "intensity": {"min": float(intensity[0]), "max": float(intensity[1])},
        "structures": {int(k): v for k, v in info.structures.items()},
        "variables": {},
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 0},
    }
    for v in info.variables:
        entry: dict[str, Any] = {"type": v.type, "parents": list(v.parents), "unit": v.unit}
        if v.measure:
            entry["measure"] = {"structure": v.measure.structure}
            if v.measure.region:
                entry["measure"]["region"] = v.measure.region
        spec["variables"][v.name] = entry
    if info.regions:
        spec["regions"] = {int(k): v for k, v in info.regions.items()}
    return spec


def _write_tiff(path: Path, arr: np.ndarray, spacing: tuple[float, ...]) -> None:
    import tifffile

    tifffile.imwrite(path.with_suffix(".tif"), arr)


def _write_nifti(path: Path, arr: np.ndarray, spacing: tuple[float, ...]) -> None:
    """``arr`` (D, H, W) = (S, A, R), or (H, W) = (A, R) as one slice, as a RAS+ NIfTI file whose
    affine holds the voxel sizes (1 mm across the slice of a 2D image)."""
    from segcft.data.nifti import _nibabel

    nib = _nibabel()
    vol = arr if arr.ndim == 3 else arr[None]
    sp = tuple(spacing) if arr.ndim == 3 else (1.0, *spacing)
    data = np.ascontiguousarray(vol.transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(data, np.diag([sp[2], sp[1], sp[0], 1.0])), str(path.with_suffix(".nii.gz")))


def write_folder(
    name: str, build: Callable[[Any, str], Any], config: Any, out: str | Path, n: int, fmt: str = "tiff"
) -> Path:
    """Write ``n`` samples of dataset ``name`` (``build(config, split)``; 80/10/10 over
    train/val/test, the first indices of each split) to the new folder ``out`` as ``fmt``
    (tiff or nifti). UserError, before anything is written, when that cannot be done."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if fmt == "nifti":
        try:
            from segcft.data.nifti import _nibabel

            _nibabel()
        except DatasetError as exc:
            raise UserError(f"--format nifti: {exc}") from None
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new path")
    datasets = {s: build(config, s) for s in SPLIT_NAMES}
    info = datasets["train"].info
    counts = split_counts(name, n, {s: len(d) for s, d in datasets.items()})
    window = HU_WINDOWS.get(name, (-1.0, 1.0)) if fmt == "nifti" else (-1.0, 1.0)
    write = _write_nifti if fmt == "nifti" else _write_tiff
    folders = ("images", "masks") + (("regions",) if info.regions else ())
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    labels = class_labels(info.structures)
    label_dtype = np.uint8 if max([*info.structures, *info.regions, 0]) < 256 else np.uint16
    rows = []
    for split, ds in datasets.items():
        for i in range(counts[split]):
            item = ds[i]
            sid = f"{split}_{i:05d}"
            image = item["image"][0].numpy().astype(np.float32)
            if window != (-1.0, 1.0):
                image = (window[0] + (image.astype(np.float64) + 1.0) / 2.0 * (window[1] - window[0])).astype(
                    np.float32
                )
            write(out / "images" / sid, image, info.spacing)
            write(out / "masks" / sid, labels[item["mask"].numpy()].astype(label_dtype), info.spacing)
            if info.regions:
                write(out / "regions" / sid, item["regions"].numpy().astype(label_dtype), info.spacing)
            values = info.denormalise(item["parents"].double()).tolist()
            rows.append(
                [sid, split]
                + [str(round(v)) if var.type == "binary" else repr(float(v)) for var, v in zip(info.variables, values)]
            )
    if len(rows) != n:
        raise DatasetError(f"dataset {name!r}: wrote {len(rows)} samples instead of {n}")
    import yaml

    (out / SPEC_FILE).write_text(yaml.safe_dump(spec_of(info, window), sort_keys=False))
    with (out / CSV_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", *info.variable_names])
        w.writerows(rows)
    return out
