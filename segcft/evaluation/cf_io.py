"""Inputs and outputs of ``segcft counterfactual``: a TIFF or NIfTI file, a subject id of the
run's folder dataset, or a sample ``split:index``, mapped onto the run's grid in [-1, 1]; and
the counterfactual written back in the input's format, grid, units and dtype family.

Writing back resamples the *difference* the model made, not the image: the output is the input
clipped to the intensity window plus that difference carried back to the input's grid, so
voxels the model left alone keep their (windowed) input values exactly, and the output stays
inside the window."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcft.data.folder_io import window_bounds
from segcft.data.imageio import read_tiff, write_tiff
from segcft.data.variables import DatasetInfo
from segcft.errors import DatasetError, UserError
from segcft.evaluation.measure import measure_words

__all__ = ["FORMATS", "Source", "read_source", "suffix_format"]

FORMATS: dict[str, tuple[str, ...]] = {"tiff": (".tif", ".tiff"), "nifti": (".nii.gz", ".nii")}
"""Image formats ``segcft counterfactual`` reads and writes, by their file name suffixes."""
_NAMES = {"tiff": "TIFF", "nifti": "NIfTI"}
_SAMPLE_ID = re.compile(r"^(?:(train|val|test):)?(\d+)$")
_SPLITS = ("test", "val", "train")


def suffix_format(path: Path | str) -> str | None:
    """The format a file name's suffix names (``tiff`` or ``nifti``), None for any other."""
    name = Path(path).name.lower()
    return next((fmt for fmt, sfx in FORMATS.items() if name.endswith(sfx)), None)


def _identity(values: np.ndarray) -> np.ndarray:
    return values


@dataclass
class Source:
    """An input on the run's grid in [-1, 1], with what is needed to write results back on the
    input's own grid, in its units, dtype family and format."""

    image: torch.Tensor  # (1, 1, *S) on the run's grid
    parents: torch.Tensor | None  # (P,) normalised; None: abducted
    regions: torch.Tensor | None  # (1, *S)
    spacing: tuple[float, ...]  # mm per axis of ``image``
    format: str  # "tiff" | "nifti"
    label: str  # what the input is, for messages
    factual: np.ndarray  # the input on its own grid, in its units (float64)
    dtype: np.dtype  # of the written counterfactual
    lo: float  # intensity mapped to -1
    hi: float  # intensity mapped to 1
    save: Callable[[Path, np.ndarray], None]  # writes an array of the input's grid in its format
    back: Callable[[np.ndarray], np.ndarray] = _identity  # a map on the run's grid -> the input's grid
    notes: list[str] = field(default_factory=list)
    out_spacing: tuple[float, ...] = ()  # mm per axis of the written files
    origin: Path | None = None  # the file read, never written over
    folder: Path | None = None  # the dataset folder it lies in, never written into

    @property
    def half_range(self) -> float:
        """Input units per unit of the [-1, 1] scale."""
        return (self.hi - self.lo) / 2.0

    def units(self, a: np.ndarray) -> np.ndarray:
        """[-1, 1] -> the input's intensity units (float64)."""
        return (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) * self.half_range + self.lo

    def written(self, x: np.ndarray, x_cf: np.ndarray) -> np.ndarray:
        """The counterfactual on the input's grid and in its dtype: the input clipped to the
        window plus the model's difference carried back, clipped to the window."""
        delta = self.back(self.units(x_cf) - self.units(x)).reshape(self.factual.shape)
        return self.cast(np.clip(np.clip(self.factual, self.lo, self.hi) + delta, self.lo, self.hi))

    def cast(self, v: np.ndarray) -> np.ndarray:
        """Values in the input's units -> its dtype (rounded and clipped for integers)."""
        if np.issubdtype(self.dtype, np.integer):
            lim = np.iinfo(self.dtype)
            return np.clip(np.rint(v), max(lim.min, self.lo), min(lim.max, self.hi)).astype(self.dtype)
        if self.dtype == np.bool_:
            return v >= 0.5 * (self.lo + self.hi)
        return v.astype(self.dtype)

    def check_out(self, path: Path | str, option: str) -> None:
        """UserError naming ``option`` when ``path``'s suffix does not name the input's format."""
        if suffix_format(path) != self.format:
            name = _NAMES[self.format]
            raise UserError(
                f"{option} {path}: the input is {name} ({self.label}), so results are written as {name}; "
                f"name the file with {' or '.join(FORMATS[self.format])}"
            )
        target = Path(path).expanduser().resolve()
        if self.origin is not None and target == self.origin.resolve():
            raise UserError(f"{option} {path}: is the input file; write the counterfactual to another file")
        if self.folder is not None and target.is_relative_to(self.folder.resolve()):
            raise UserError(f"{option} {path}: inside the dataset folder {self.folder}; segcft never writes into it")


def read_source(run: Any, input: str | Path) -> Source:
    """The ``--input`` of a what-if: an existing file (.tif/.tiff, .nii.gz/.nii), a subject id
    of the run's folder dataset (``case_007``), or a sample ``split:index`` (``test:12``; a bare
    number is a test index unless it is a subject id). UserError naming ``--input`` otherwise."""
    text = str(input).strip()
    path = Path(text)
    if path.is_file():
        fmt = suffix_format(path)
        if fmt == "nifti":
            return _nifti_file(run, path)
        if fmt == "tiff":
            return _tiff_file(run, path)
        raise UserError(f"--input {path}: expected a .tif/.tiff or .nii.gz/.nii file")
    m = _SAMPLE_ID.fullmatch(text)
    if m and m.group(1):
        return _sample(run, text, m.group(1), int(m.group(2)))
    for split in _SPLITS:
        ds = run.dataset(split)
        ids = getattr(ds, "ids", None)
        if ids is not None and text in ids:
            return _subject(run, ds, split, ids.index(text))
    if m:
        return _sample(run, text, "test", int(m.group(2)))
    fmt = suffix_format(path)
    if fmt is not None or path.parent != Path("."):
        raise UserError(f"--input {text!r}: no such {_NAMES.get(fmt or '', 'image')} file")
    ids = getattr(run.dataset("test"), "ids", None)
    known = f"the run's dataset has ids such as {', '.join(ids[:3])}" if ids else "the run's dataset has no ids"
    raise UserError(f"--input {text!r}: no such file, subject id ({known}) or sample (such as test:12)")


def _sample(run: Any, text: str, split: str, idx: int) -> Source:
    """Sample ``idx`` of ``split``: a folder dataset's subject, or a phantom sample written as a
    float32 TIFF in [-1, 1] at the run's spacing."""
    info: DatasetInfo = run.info
    ds = run.dataset(split)
    if idx >= len(ds):
        raise UserError(f"--input {text!r}: the {split} split has {len(ds)} samples (0..{len(ds) - 1})")
    if getattr(ds, "ids", None) is not None:
        return _subject(run, ds, split, idx)
    item = ds[idx]
    x = _item_image(item)
    spacing = tuple(info.spacing)
    return Source(
        image=x,
        parents=torch.as_tensor(item["parents"]).float(),
        regions=_item_regions(item),
        spacing=spacing,
        format="tiff",
        label=f"{split} sample {idx}",
        factual=x[0, 0].double().numpy(),
        dtype=np.dtype(np.float32),
        lo=-1.0,
        hi=1.0,
        save=lambda p, a: write_tiff(p, a, spacing),
        notes=[f"parents: recorded values of {split} sample {idx}"],
        out_spacing=spacing,
    )


def _item_image(item: dict[str, Any]) -> torch.Tensor:
    return torch.as_tensor(item["image"]).float().unsqueeze(0)


def _item_regions(item: dict[str, Any]) -> torch.Tensor | None:
    regions = item.get("regions")
    return None if regions is None else torch.as_tensor(regions).long().unsqueeze(0)


def _subject(run: Any, ds: Any, split: str, idx: int) -> Source:
    """Subject ``idx`` of a folder dataset's ``split``, written back in its source file's format,
    grid and dtype, through the inverse of the dataset's window, reorientation and resampling."""
    sid = ds.ids[idx]
    item = ds[idx]
    spec = ds.spec
    path = ds.image_path(sid)
    common: dict[str, Any] = dict(
        image=_item_image(item),
        parents=torch.as_tensor(item["parents"]).float(),
        regions=_item_regions(item),
        spacing=tuple(run.info.spacing),
        label=f"subject {sid}, {split} sample {idx}",
        origin=path,
        folder=Path(ds.root),
        notes=[f"subject {sid} ({path.name}, {split} sample {idx}); parents: its recorded values"],
    )
    if hasattr(ds, "geometry"):
        from segcft.data import nifti

        arr, geom, img = nifti.read_image(path)
        lo, hi = window_bounds(arr, spec.window, spec.percentiles)
        return Source(
            format="nifti",
            factual=arr.astype(np.float64),
            dtype=_nifti_dtype(img),
            lo=lo,
            hi=hi,
            save=lambda p, a: nifti.write_image(p, a, img),
            back=lambda d: nifti.grid_to_file(d, geom, tuple(run.info.spacing)),
            out_spacing=geom.spacing,
            **common,
        )
    arr, _ = read_tiff(path)
    lo, hi = window_bounds(arr, spec.window, spec.percentiles)
    file_spacing = tuple(float(s) for s in spec.spacing)
    return Source(
        format="tiff",
        factual=arr.astype(np.float64),
        dtype=arr.dtype,
        lo=lo,
        hi=hi,
        save=lambda p, a: write_tiff(p, a, file_spacing),
        back=lambda d: ds.grid_to_file(d, arr.shape),
        out_spacing=file_spacing,
        **common,
    )


def _nifti_dtype(img: Any) -> np.dtype:
    """On-disk dtype of a NIfTI image; float32 when its header scales the stored values."""
    slope, inter = (float(getattr(img.dataobj, k, d)) for k, d in (("slope", 1.0), ("inter", 0.0)))
    scaled = slope != 1.0 or inter != 0.0
    return np.dtype(np.float32) if scaled else np.dtype(img.get_data_dtype())


def _no_regions(run: Any, path: Path) -> None:
    info: DatasetInfo = run.info
    regional = [v.name for v in info.structure_variables if v.measure is not None and v.measure.region]
    if regional:
        raise UserError(
            f"--input {path}: the run has region-level variables ({', '.join(regional)}) and a file carries no "
            "region map; use a subject id or a sample such as test:12"
        )


def _nifti_file(run: Any, path: Path) -> Source:
    """A NIfTI file: reoriented to RAS+, windowed as the run's NIfTI dataset does (else by the
    file's own range) and resampled to the run's spacing (its one slice for a 2D run), which must give
    the run's shape."""
    from segcft.data import nifti

    info: DatasetInfo = run.info
    try:
        arr, geom, img = nifti.read_image(path)
    except DatasetError as e:
        raise UserError(f'--input {path}: reading NIfTI needs nibabel; pip install "segcft[nifti]" ({e})') from None
    except Exception as e:  # nibabel raises many types on corrupt input
        raise UserError(f"--input {path}: cannot read the NIfTI file: {e}".splitlines()[0]) from None
    if info.spatial_dims == 2 and geom.canonical_shape()[0] != 1:
        raise UserError(f"--input {path}: a NIfTI volume does not fit the run's 2D images of shape {info.shape}")
    _no_regions(run, path)
    size = nifti.resampled_shape(geom, info.spacing)
    if size != tuple(info.shape):
        sp = " x ".join(f"{s:g}" for s in info.spacing)
        raise UserError(
            f"--input {path}: resampled to the run's spacing ({sp} mm) the image has shape {size}, "
            f"but the run's images have shape {tuple(info.shape)}"
        )
    notes = []
    if run.config.dataset.name == "nifti":
        spec = run.dataset("test").spec
        lo, hi = window_bounds(arr, spec.window, spec.percentiles)
        notes.append(f"intensity window of the run's dataset: [{lo:g}, {hi:g}] -> [-1, 1]")
    else:
        lo, hi = _range(arr, path)
        notes.append(f"intensity window of the input: [{lo:g}, {hi:g}] -> [-1, 1]")
    unit = np.clip((arr.astype(np.float32) - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    x = nifti.image_to_grid(unit, geom, info.spacing, info.shape)
    sizes = (" x ".join(f"{v:.4g}" for v in sp) for sp in (geom.spacing, info.spacing))
    notes.append("reoriented to RAS+ and resampled from {} to {} mm".format(*sizes))
    return Source(
        image=x.reshape(1, 1, *info.shape).float(),
        parents=None,
        regions=None,
        spacing=tuple(info.spacing),
        format="nifti",
        label=f"file {path.name}",
        factual=arr.astype(np.float64),
        dtype=_nifti_dtype(img),
        lo=lo,
        hi=hi,
        save=lambda p, a: nifti.write_image(p, a, img),
        back=lambda d: nifti.grid_to_file(d, geom, tuple(info.spacing)),
        notes=notes,
        out_spacing=geom.spacing,
        origin=path,
    )


def _range(values: np.ndarray, path: Path) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise UserError(f"--input {path}: the image is constant ({lo:g}); nothing to edit")
    return lo, hi


def _tiff_file(run: Any, path: Path) -> Source:
    """A TIFF file of the run's shape, mapped to [-1, 1] by its own intensity range."""
    info: DatasetInfo = run.info
    try:
        array, spacing = read_tiff(path)
    except UserError as e:
        raise UserError(f"--input {e}") from None
    squeezed = np.squeeze(array)
    if squeezed.ndim != info.spatial_dims or tuple(squeezed.shape) != tuple(info.shape):
        raise UserError(
            f"--input {path}: image of shape {tuple(array.shape)} does not fit the run's "
            f"{info.spatial_dims}D images of shape {tuple(info.shape)}"
        )
    if squeezed.dtype.kind not in "biuf":
        raise UserError(f"--input {path}: unsupported pixel type {squeezed.dtype}")
    values = squeezed.astype(np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"--input {path}: the image contains NaN or infinite values")
    lo, hi = _range(values, path)
    unit = torch.from_numpy(((values - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32))
    notes = [f"intensity window of the input: [{lo:g}, {hi:g}] -> [-1, 1]"]
    if spacing is None:
        spacing = tuple(info.spacing)
        notes.append("no spacing in the TIFF tags: using the run's spacing")
    elif any(abs(a - b) > 1e-3 * max(abs(b), 1e-12) for a, b in zip(spacing, info.spacing)):
        notes.append(
            f"warning: the input's spacing {tuple(spacing)} differs from the run's {tuple(info.spacing)}; "
            f"{measure_words(info.spatial_dims)[0]} use the input's spacing"
        )
    _no_regions(run, path)
    sp = tuple(float(s) for s in spacing)
    return Source(
        image=unit.reshape(1, 1, *info.shape),
        parents=None,
        regions=None,
        spacing=sp,
        format="tiff",
        label=f"file {path.name}",
        factual=values,
        dtype=squeezed.dtype,
        lo=lo,
        hi=hi,
        save=lambda p, a: write_tiff(p, a, sp),
        notes=notes,
        out_spacing=sp,
        origin=path,
    )
