"""nifti: user datasets of NIfTI images (3D CT in HU, say), label masks and a CSV of variables.

Layout (nothing is ever written into this folder)::

    DATASET/dataset.yaml
    DATASET/images/<id>.nii.gz   3D, any orientation and voxel size (``.nii`` too); 2D: one slice
    DATASET/masks/<id>.nii.gz    same grid, integer labels (0 background)
    DATASET/regions/<id>.nii.gz  optional, same grid, integer region ids (0 outside)
    DATASET/attributes.csv       column ``id``, one column per variable, optional ``split``

dataset.yaml, attributes.csv, the splits and the labels are the format-independent folder
layer (segcft/data/folder.py); ``spacing`` is optional here. Geometry comes from each file's
affine: the array is reoriented to the closest canonical orientation, RAS+ (as
``nibabel.as_closest_canonical``), and its axes are put slowest first, so segcft's (D, H, W)
run along (S, A, R): inferior to superior, posterior to anterior, left to right. Each sample
is then resampled to one spacing (dataset.yaml ``spacing`` in mm, slowest first, or else the
per-axis median of the training split's voxel sizes, read from headers only): images
trilinearly, masks and regions by nearest neighbour; then centre-cropped or padded (image -1,
masks 0) to the dataset size (config ``size``, or else the per-axis median resampled shape of
the training split). Structure variables are measured on the ORIGINAL voxels (label count
times that file's voxel volume), so resampling does not bias them. ``geometry(sid)`` gives a
sample's original affine, shape and voxel sizes, to write outputs back on its grid.

Every file is checked as it is read, as in the ``tiff`` format: at most MAX_VOXELS voxels and
3 axes (from the header, before decoding), inside the dataset folder, finite image values,
declared mask and region labels (integer dtype, or floats holding whole numbers).
A 2D dataset (``spatial_dims: 2``) stores each image as one axial slice; its (H, W) are (A, R)
and its structure variables are areas (label count times pixel area).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.configs import NiftiConfig
from segcft.data.folder import (
    CSV_FILE,
    SPEC_FILE,
    SPLIT_NAMES,
    BadValues,
    FolderDataset,
    Problem,
    Spec,
    Table,
    check_values,
    crop_pad,
    folder_info,
    inside,
    measure_sample,
    raise_problems,
    resize,
    uncrop_pad,
    window,
)
from segcft.data.folder import measure as folder_measure
from segcft.data.folder import scan as folder_scan
from segcft.data.imageio import MAX_VOXELS
from segcft.data.variables import DatasetInfo
from segcft.errors import DatasetError

SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Geometry:
    """Where a sample's voxels lie: the file's affine (voxel indices to RAS+ mm), its array
    shape and voxel sizes (mm) in the file's own axis order, as stored."""

    affine: np.ndarray
    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def canonical_spacing(self) -> tuple[float, ...]:
        """Voxel sizes along segcft's (D, H, W) = (S, A, R) axes after reorientation."""
        nib = _nibabel()
        ornt = nib.orientations.io_orientation(self.affine)
        ras = [0.0, 0.0, 0.0]
        for axis, out in enumerate(ornt[:, 0].astype(int)):
            ras[out] = self.spacing[axis]
        return tuple(reversed(ras))

    def canonical_shape(self) -> tuple[int, ...]:
        """Array shape along (D, H, W) = (S, A, R) after reorientation (before resampling)."""
        nib = _nibabel()
        ornt = nib.orientations.io_orientation(self.affine)
        ras = [0, 0, 0]
        for axis, out in enumerate(ornt[:, 0].astype(int)):
            ras[out] = self.shape[axis]
        return tuple(reversed(ras))


def _nibabel() -> Any:
    """The nibabel module; DatasetError naming the extra to install when it is missing."""
    try:
        import nibabel
    except ImportError:
        raise DatasetError('nifti dataset: nibabel is not installed; pip install "segcft[nifti]"') from None
    return nibabel


def is_nifti_folder(root: Path) -> bool:
    """Whether a dataset folder's images are NIfTI files (how `segcft data` picks the format)."""
    images = root / "images"
    return images.is_dir() and any(p.name.endswith(SUFFIXES) for p in images.iterdir())


def _stem(name: str) -> str | None:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _inside(root: Path, folder: str, sid: str) -> Path:
    """The resolved path of ``folder/<sid>.nii.gz`` (or ``.nii`` when only that exists), inside the dataset folder."""
    name = f"{sid}.nii.gz"
    if not (root / folder / name).exists() and (root / folder / f"{sid}.nii").exists():
        name = f"{sid}.nii"
    return inside(root, folder, name)


def _open(path: Path) -> tuple[Any, Geometry]:
    """The nibabel image (data not decoded) and its geometry, checked from the header alone:
    3 axes (a trailing axis of length 1 is dropped; a 2D array is one slice) and at most MAX_VOXELS voxels."""
    nib = _nibabel()
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise BadValues(f"expected a 3D image (spatial_dims), got shape {shape}")
    if 0 in shape:
        raise ValueError("no image data")
    if math.prod(shape) > MAX_VOXELS:
        raise BadValues(f"shape {shape} has {math.prod(shape)} voxels, more than the limit of {MAX_VOXELS} (2**28)")
    dtype = np.dtype(img.get_data_dtype())
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise BadValues(f"expected integer or float voxels, got dtype {dtype}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) == 0:
        raise BadValues(f"the header's affine is not invertible: {affine[:3].tolist()}")
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(affine))
    return img, Geometry(affine, shape, spacing)


def _array(img: Any, geom: Geometry) -> np.ndarray:
    return np.asanyarray(img.dataobj).reshape(geom.shape)


def read_image(path: Path) -> tuple[np.ndarray, Geometry, Any]:
    """A NIfTI file outside any dataset (``segcft counterfactual --input``): its values with the
    header's scaling applied, its geometry and the nibabel image (for its header and on-disk
    dtype). Checked as dataset files are (3D or one 2D slice, MAX_VOXELS, numeric, invertible
    affine, finite); raises DatasetError when nibabel is missing, BadValues or nibabel's errors otherwise."""
    img, geom = _open(path)
    arr = _array(img, geom)
    if not np.isfinite(arr).all():
        raise BadValues("the image contains NaN or infinite values")
    return arr, geom, img


def write_image(path: Path, array: np.ndarray, like: Any) -> None:
    """Write ``array`` (the file grid of ``like``, a nibabel image) as NIfTI with ``like``'s
    header: same affine, orientation, voxel sizes and units; the array's dtype on disk."""
    nib = _nibabel()
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    out = type(like)(array.reshape(like.shape), like.affine, header=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(path))


def to_canonical(arr: np.ndarray, geom: Geometry) -> np.ndarray:
    """An array in the file's axes reoriented to RAS+ with axes (D, H, W) = (S, A, R)."""
    nib = _nibabel()
    ras = nib.orientations.apply_orientation(arr, nib.orientations.io_orientation(geom.affine))
    return np.ascontiguousarray(ras.transpose(2, 1, 0))


def from_canonical(arr: np.ndarray, geom: Geometry) -> np.ndarray:
    """The inverse of ``to_canonical``: (D, H, W) = (S, A, R) back to the file's axes and directions."""
    nib = _nibabel()
    o = nib.orientations
    back = o.ornt_transform(o.axcodes2ornt("RAS"), o.io_orientation(geom.affine))
    return np.ascontiguousarray(o.apply_orientation(arr.transpose(2, 1, 0), back))


def resampled_shape(geom: Geometry, spacing: tuple[float, ...]) -> tuple[int, ...]:
    """(D, H, W) shape of a file once reoriented and resampled to ``spacing`` (before crop/pad);
    in 2D (two spacings), the one slice's (H, W)."""
    k = 3 - len(spacing)
    pairs = zip(geom.canonical_shape()[k:], geom.canonical_spacing()[k:], spacing)
    return tuple(max(1, round(n * s / t)) for n, s, t in pairs)


def image_to_grid(unit: np.ndarray, geom: Geometry, spacing: tuple[float, ...], shape: tuple[int, ...]) -> Any:
    """An image already mapped to [-1, 1], in the file's axes, onto a run's grid: reoriented,
    resampled (bi/tri)linearly to ``spacing`` and centre-cropped or padded (-1) to ``shape``;
    in 2D (two spacings), the one axial slice."""
    import torch

    t = torch.from_numpy(to_canonical(unit, geom))
    if len(spacing) == 2:
        t = t[0]
    t = resize(t, resampled_shape(geom, spacing), True)
    return crop_pad(t.clamp(-1.0, 1.0), tuple(shape), -1.0)


def grid_to_file(values: np.ndarray, geom: Geometry, spacing: tuple[float, ...]) -> np.ndarray:
    """The inverse of ``image_to_grid``'s geometry for a map on the run's grid (a difference,
    say): un-cropped (0 where the crop cut the file), resampled linearly back to the file's
    voxel sizes and put back in the file's axes, shape ``geom.shape``."""
    import torch

    t = uncrop_pad(torch.from_numpy(np.asarray(values, dtype=np.float64)), resampled_shape(geom, spacing))
    t = resize(t, geom.canonical_shape()[3 - len(spacing) :], True)
    if len(spacing) == 2:
        t = t[None]
    return from_canonical(t.numpy(), geom)


def _values(folder: str, arr: np.ndarray, spec: Spec) -> np.ndarray:
    """``check_values``, with labels also accepted as floats holding whole numbers."""
    return check_values(folder, arr, spec, float_labels=True)


def _decode(root: Path, spec: Spec, folder: str, sid: str) -> tuple[np.ndarray, Geometry]:
    img, geom = _open(_inside(root, folder, sid))
    return _values(folder, _array(img, geom), spec), geom


def _unreadable(exc: Exception) -> str:
    return f"unreadable or corrupt NIfTI ({type(exc).__name__}: {exc})".splitlines()[0]


def read_sample_file(root: Path, spec: Spec, folder: str, sid: str) -> tuple[np.ndarray, Geometry]:
    """File ``folder/<sid>.nii.gz`` in its stored orientation and grid, checked as it is read
    (see ``_values``), with its geometry; DatasetError naming the file and the offending value."""
    try:
        return _decode(root, spec, folder, sid)
    except DatasetError:
        raise
    except Exception as exc:  # nibabel raises many types on corrupt input
        what = f"{exc}" if isinstance(exc, BadValues) else _unreadable(exc)
        raise DatasetError(f"dataset {root}: {folder}/{sid}.nii.gz: {what}".splitlines()[0]) from exc


def _check_file(root: Path, spec: Spec, folder: str, sid: str, deep: bool, problems: list[Problem]) -> Geometry | None:
    """The geometry of one file, or None with a problem when it is missing or breaks the contract."""
    rel = f"{folder}/{sid}.nii.gz"
    try:
        p = _inside(root, folder, sid)
    except BadValues as exc:
        problems.append(Problem(str(exc), rel))
        return None
    if not p.is_file():
        what = f"id {sid!r} in {CSV_FILE} has no image file" if folder == "images" else f"missing {folder[:-1]} file"
        problems.append(Problem(f"{what} (.nii.gz or .nii)", rel))
        return None
    rel = f"{folder}/{p.name}"
    try:
        img, geom = _open(p)
        if deep:
            _values(folder, _array(img, geom), spec)
    except DatasetError:
        raise
    except BadValues as exc:
        problems.append(Problem(str(exc), rel, key=exc.key))
        return None
    except Exception as exc:  # nibabel raises many types on corrupt input
        problems.append(Problem(_unreadable(exc), rel))
        return None
    return geom


def check_files(root: Path, spec: Spec, table: Table, problems: list[Problem], deep: bool) -> dict[str, Geometry]:
    """Check every image, mask and region file of the table (headers only unless ``deep``:
    then also decode them and check values); returns the geometry of each readable image."""
    _nibabel()
    geoms: dict[str, Geometry] = {}
    folders = ["images", "masks"] + (["regions"] if spec.regions else [])
    listed = set(table.ids)
    if (root / "images").is_dir():
        for p in sorted((root / "images").iterdir()):
            stem = _stem(p.name)
            if stem is not None and stem not in listed:
                problems.append(Problem(f"image {stem!r} has no row in {CSV_FILE}", f"images/{p.name}"))
    else:
        problems.append(Problem("missing folder of images", "images"))
    for sid in table.ids:
        got = {f: _check_file(root, spec, f, sid, deep, problems) for f in folders}
        image = got["images"]
        if image is None:
            continue
        if spec.spatial_dims == 2 and image.canonical_shape()[0] != 1:
            problems.append(
                Problem(f"expected one axial slice (spatial_dims 2), got shape {image.shape}", f"images/{sid}.nii.gz")
            )
            continue
        geoms[sid] = image
        for folder in folders[1:]:
            g = got[folder]
            if g is not None and (g.shape != image.shape or not np.allclose(g.affine, image.affine, atol=1e-3)):
                problems.append(
                    Problem(
                        f"grid (shape {g.shape}, affine) differs from the image's (shape {image.shape})",
                        f"{folder}/{sid}.nii.gz",
                    )
                )
    return geoms


def _measure_one(root: Path, spec: Spec, sid: str) -> list[float]:
    """Volume (mm^3; area in mm^2 in 2D) of every structure variable: label count on the original
    voxels times that file's voxel volume (pixel area)."""
    classes, geom = read_sample_file(root, spec, "masks", sid)
    regions = read_sample_file(root, spec, "regions", sid)[0] if spec.regions else None
    voxel = geom.voxel_volume if spec.spatial_dims == 3 else geom.voxel_volume / geom.canonical_spacing()[0]
    return measure_sample(classes, regions, spec, voxel)


def scan(root: Path, deep: bool) -> tuple[Spec | None, Table | None, dict[str, Geometry], list[Problem]]:
    """Validate a NIfTI dataset folder: spec, table and files. Reads only; writes nothing."""
    return folder_scan(root, deep, check_files, spacing_optional=True)


def measure(root: Path, spec: Spec, table: Table) -> np.ndarray:
    """(N, P) measured structure variables (NaN for the others) of every sample."""
    return folder_measure(table, spec, functools.partial(_measure_one, root, spec))


@functools.lru_cache(maxsize=4)
def _load(root_str: str, size: tuple[int, ...], stamp: float) -> tuple[Spec, Table, DatasetInfo, dict[str, Geometry]]:
    root = Path(root_str)
    spec, table, geoms, problems = scan(root, deep=False)
    if problems:
        raise_problems(problems, root)
    assert spec is not None and table is not None
    if size and len(size) != spec.spatial_dims:
        raise DatasetError(f"dataset {root}: size {list(size)} must have {spec.spatial_dims} entries (spatial_dims)")
    train_ids = [sid for sid, s in zip(table.ids, table.splits) if s == "train"]
    spacing = spec.spacing
    if not spacing:
        spacing = tuple(
            float(x)
            for x in np.median([geoms[s].canonical_spacing()[3 - spec.spatial_dims :] for s in train_ids], axis=0)
        )
    if size:
        target = tuple(size)
    else:
        shapes = [resampled_shape(geoms[s], spacing) for s in train_ids]
        target = tuple(int(x) for x in np.median(shapes, axis=0).round())
    if table.measured:
        m = measure(root, spec, table)
        table.values[:, table.measured] = m[:, table.measured]
    info = folder_info(spec, table, target, spacing)
    return spec, table, info, geoms


class NiftiDataset(FolderDataset):
    """One split of a NIfTI dataset folder; items are read, reoriented and resampled on access."""

    def __init__(
        self, root: Path, spec: Spec, table: Table, info: DatasetInfo, geoms: dict[str, Geometry], split: str
    ) -> None:
        super().__init__(root, spec, table, info, split, suffix=".nii.gz")
        self._geoms = geoms

    def geometry(self, sid: str) -> Geometry:
        """The original affine, shape and voxel sizes of sample ``sid`` (to write outputs back)."""
        return self._geoms[sid]

    def image_path(self, sid: str) -> Path:
        """The image file of subject ``sid`` (``images/<sid>.nii.gz`` or ``.nii``)."""
        return _inside(self.root, "images", sid)

    def canonical(self, folder: str, sid: str) -> Any:
        """File ``folder/<sid>`` reoriented to RAS+, axes (D, H, W) = (S, A, R), resampled to the
        dataset spacing (images linearly in [-1, 1] by ``image_to_grid``, labels nearest) and
        cropped/padded to its shape; in 2D, (H, W) = (A, R) of the one slice."""
        import torch

        arr, geom = read_sample_file(self.root, self._spec, folder, sid)
        if folder == "images":
            return image_to_grid(window(arr, self._spec), geom, self.info.spacing, self.info.shape)
        t = torch.from_numpy(to_canonical(arr, geom))
        if self.info.spatial_dims == 2:
            t = t[0]
        return crop_pad(resize(t, resampled_shape(geom, self.info.spacing), False), self.info.shape, 0)

    def read(self, folder: str, sid: str) -> Any:
        """Items are ``canonical`` (at the dataset shape already; ``fit`` leaves them as they are)."""
        return self.canonical(folder, sid)

    def fit(self, t: Any, folder: str) -> Any:
        """``t`` unchanged: ``canonical`` already resampled and cropped it."""
        return t


def check(config: NiftiConfig) -> list[Problem]:
    """Every problem of the folder at ``config.path`` (layout, dataset.yaml, CSV, each file decoded)."""
    if not config.path:
        return [Problem(f"nifti dataset: no path set (give the folder containing {SPEC_FILE}, or --set path=DIR)")]
    return scan(Path(config.path).expanduser().resolve(), deep=True)[3]


def build(config: NiftiConfig, split: str) -> NiftiDataset:
    """The ``split`` (train, val, test) of the NIfTI dataset at ``config.path``; raises
    DatasetError listing the first problems when the folder does not meet the layout."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    if not config.path:
        raise DatasetError("nifti dataset: set path to the dataset folder (the one containing dataset.yaml)")
    _nibabel()
    root = Path(config.path).expanduser().resolve()
    stamp = max((p.stat().st_mtime for p in (root / SPEC_FILE, root / CSV_FILE) if p.exists()), default=0.0)
    spec, table, info, geoms = _load(str(root), tuple(int(s) for s in config.size), stamp)
    return NiftiDataset(root, spec, table, info, geoms, split)
