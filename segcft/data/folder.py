"""folder: the public dataset-folder layer, for the built-in ``tiff`` and ``nifti`` formats and for
dataset plugins that read their own files.

A dataset folder holds ``dataset.yaml``, ``attributes.csv`` and one file per sample in
``images/``, ``masks/`` and optionally ``regions/`` (docs/data.md). The layer has three parts,
all importable from here:

- the schema (segcft/data/folder_spec.py): ``read_spec`` (dataset.yaml, documents the keys),
  ``read_table`` (attributes.csv), the splits, ``class_labels`` / ``labels_to_classes`` and the
  ``Problem`` records that ``segcft data check`` prints;
- the array helpers (segcft/data/folder_io.py): ``inside``, ``check_values``, ``window``,
  ``window_bounds``, ``measure_sample``, ``crop_pad``, ``resize``, ``fit_shape``, ``uncrop_pad``;
- here: a format as a ``FileFormat`` (suffix, header reader, array reader), the checks of its
  files (``check_files``, ``scan``, ``check_folder``), reading (``read_file``), measuring
  (``measure``, ``measure_file``), loading (``load``, ``folder_info``, ``build_split``) and the one
  Dataset class of the folder formats, ``FolderDataset``, so that a new format needs only its
  ``FileFormat``, a ``build`` and a ``check`` (docs/plugins.md, "A folder dataset").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from segcft.data.folder_io import (
    BadValues,
    check_values,
    crop_pad,
    fit_shape,
    inside,
    measure_sample,
    resize,
    uncrop_pad,
    window,
    window_bounds,
)
from segcft.data.folder_spec import (
    CSV_FILE,
    SPEC_FILE,
    SPLIT_NAMES,
    Problem,
    Spec,
    Table,
    class_labels,
    labels_to_classes,
    raise_problems,
    read_spec,
    read_table,
)

# the schema's readers, for tests comparing docs/data.md's key table with the code
from segcft.data.folder_spec import _read_intensity as _read_intensity
from segcft.data.folder_spec import _read_measure as _read_measure
from segcft.data.folder_spec import _read_splits as _read_splits
from segcft.data.folder_spec import _read_variable as _read_variable
from segcft.data.folder_spec import _read_yaml as _read_yaml
from segcft.data.imageio import MAX_VOXELS
from segcft.data.variables import DatasetInfo, fit_normalisation
from segcft.errors import DatasetError

__all__ = [
    "CSV_FILE",
    "SPEC_FILE",
    "SPLIT_NAMES",
    "BadValues",
    "FileFormat",
    "FolderDataset",
    "Problem",
    "Spec",
    "Table",
    "build_split",
    "check_files",
    "check_folder",
    "check_values",
    "class_labels",
    "crop_pad",
    "fit_shape",
    "folder_info",
    "inside",
    "labels_to_classes",
    "load",
    "measure",
    "measure_file",
    "measure_sample",
    "raise_problems",
    "read_file",
    "read_spec",
    "read_table",
    "resize",
    "scan",
    "uncrop_pad",
    "window",
    "window_bounds",
]

G = TypeVar("G")  # what a format's check_files records per sample (shape, geometry)


@dataclass(frozen=True)
class FileFormat:
    """How one kind of sample file is read: ``name`` (in messages, e.g. ``TIFF``), ``suffix``
    (``.tif``), ``header(path) -> (shape, dtype)`` read without decoding the voxels, and
    ``read(path) -> array`` (the decoded file). Both may raise anything on a corrupt file."""

    name: str
    suffix: str
    header: Callable[[Path], tuple[tuple[int, ...], np.dtype]]
    read: Callable[[Path], np.ndarray]


def _unreadable(fmt: FileFormat, exc: Exception) -> str:
    return f"unreadable or corrupt {fmt.name} ({type(exc).__name__}: {exc})".splitlines()[0]


def _checked_header(fmt: FileFormat, path: Path, spec: Spec) -> tuple[tuple[int, ...], np.dtype]:
    """The header's shape and dtype; BadValues when it is not ``spatial_dims``-D or too large."""
    shape, dtype = fmt.header(path)
    shape = tuple(int(s) for s in shape)
    if len(shape) != spec.spatial_dims:
        raise BadValues(f"expected a {spec.spatial_dims}D array (spatial_dims), got shape {shape}")
    if math.prod(shape) > MAX_VOXELS:
        raise BadValues(f"shape {shape} has {math.prod(shape)} voxels, more than the limit of {MAX_VOXELS} (2**28)")
    return shape, np.dtype(dtype)


def _decode(fmt: FileFormat, root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    path = inside(root, folder, f"{sid}{fmt.suffix}")
    shape, _ = _checked_header(fmt, path, spec)
    arr = np.asarray(fmt.read(path))
    if arr.size == 0:  # some readers return an empty array for a corrupt file
        raise ValueError("no image data")
    if tuple(arr.shape) != shape:
        raise BadValues(f"the header declares shape {shape}, the data has shape {tuple(arr.shape)}")
    return check_values(folder, arr, spec)


def read_file(fmt: FileFormat, root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    """File ``folder/<sid><suffix>`` checked as it is read (header first, then ``check_values``):
    images as finite float32, masks as class indices, regions as declared ids (int64).
    DatasetError naming the file and the offending value for anything else."""
    try:
        return _decode(fmt, root, spec, folder, sid)
    except Exception as exc:  # readers raise many types on corrupt input
        what = str(exc) if isinstance(exc, BadValues) else _unreadable(fmt, exc)
        raise DatasetError(f"dataset {root}: {folder}/{sid}{fmt.suffix}: {what}".splitlines()[0]) from exc


def _check_one(
    fmt: FileFormat, root: Path, spec: Spec, folder: str, sid: str, deep: bool, problems: list[Problem]
) -> tuple[int, ...] | None:
    """The shape of one file, or None with a problem when it is missing or breaks the contract."""
    rel = f"{folder}/{sid}{fmt.suffix}"
    try:
        p = inside(root, folder, f"{sid}{fmt.suffix}")
    except BadValues as exc:
        problems.append(Problem(str(exc), rel))
        return None
    if not p.is_file():
        what = f"id {sid!r} in {CSV_FILE} has no image file" if folder == "images" else f"missing {folder[:-1]} file"
        problems.append(Problem(what if folder == "images" else f"{what} for id {sid!r}", rel))
        return None
    try:
        shape, dtype = _checked_header(fmt, p, spec)
        if folder != "images" and not np.issubdtype(dtype, np.integer):
            raise BadValues(f"{folder} must hold integer labels, got dtype {dtype}")
        if folder == "images" and not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise BadValues(f"images must be integer or float, got dtype {dtype}")
        if deep:
            _decode(fmt, root, spec, folder, sid)
    except BadValues as exc:
        problems.append(Problem(str(exc), rel, key=exc.key))
        return None
    except Exception as exc:  # readers raise many types on corrupt input
        problems.append(Problem(_unreadable(fmt, exc), rel))
        return None
    return shape


def check_files(
    fmt: FileFormat, root: Path, spec: Spec, table: Table, problems: list[Problem], deep: bool
) -> dict[str, tuple[int, ...]]:
    """Check every image, mask and region file of the table (headers only unless ``deep``: then
    also decode them and check their values); returns the shape of each readable image."""
    shapes: dict[str, tuple[int, ...]] = {}
    folders = ["images", "masks"] + (["regions"] if spec.regions else [])
    listed = set(table.ids)
    if (root / "images").is_dir():
        for p in sorted((root / "images").glob(f"*{fmt.suffix}")):
            if p.name[: -len(fmt.suffix)] not in listed:
                problems.append(
                    Problem(f"image {p.name[: -len(fmt.suffix)]!r} has no row in {CSV_FILE}", f"images/{p.name}")
                )
    else:
        problems.append(Problem("missing folder of images", "images"))
    for sid in table.ids:
        got = {f: _check_one(fmt, root, spec, f, sid, deep, problems) for f in folders}
        image = got["images"]
        if image is None:
            continue
        shapes[sid] = image
        for folder in folders[1:]:
            shape = got[folder]
            if shape is not None and shape != image:
                problems.append(
                    Problem(f"shape {shape} differs from the image shape {image}", f"{folder}/{sid}{fmt.suffix}")
                )
    return shapes


def scan(
    root: Path,
    deep: bool,
    check_files: Callable[[Path, Spec, Table, list[Problem], bool], dict[str, G]],
    spacing_optional: bool = False,
) -> tuple[Spec | None, Table | None, dict[str, G], list[Problem]]:
    """Validate a dataset folder (spec, table, then files with the format's ``check_files``); writes nothing."""
    problems: list[Problem] = []
    if not root.is_dir():
        return None, None, {}, [Problem(f"not a dataset folder (expected a directory with {SPEC_FILE})", str(root))]
    spec = read_spec(root, problems, spacing_optional=spacing_optional)
    table = read_table(root, spec, problems) if spec is not None else None
    found: dict[str, G] = {}
    if spec is not None and table is not None:
        found = check_files(root, spec, table, problems, deep)
        if not any(s == "train" for s in table.splits):
            problems.append(
                Problem("no sample in the train split (normalisation is fitted on it)", CSV_FILE, key="split")
            )
    return spec, table, found, problems


def check_folder(fmt: FileFormat, path: str | Path) -> list[Problem]:
    """Every problem of the folder at ``path`` in format ``fmt``: layout, dataset.yaml,
    attributes.csv and each file decoded (what ``segcft data check`` reports); reads only."""
    if not str(path):
        return [Problem(f"{fmt.name} dataset: no path set (give the folder containing {SPEC_FILE}, or --set path=DIR)")]
    return scan(Path(path).expanduser().resolve(), True, functools.partial(check_files, fmt))[3]


def measure(table: Table, spec: Spec, measure_one: Callable[[str], list[float]]) -> np.ndarray:
    """(N, P) measured structure variables (NaN for the others) of every sample, via the format's ``measure_one``."""
    rows = [measure_one(sid) for sid in table.ids]
    return np.asarray(rows, dtype=np.float64).reshape(len(table.ids), len(spec.variables))


def folder_info(spec: Spec, table: Table, shape: tuple[int, ...], spacing: tuple[float, ...]) -> DatasetInfo:
    """The ``DatasetInfo`` of a folder at ``shape`` and ``spacing``, normalisation fitted on its train rows."""
    train = table.values[[s == "train" for s in table.splits]]
    return DatasetInfo(
        name=spec.name,
        spatial_dims=spec.spatial_dims,
        shape=tuple(shape),
        spacing=tuple(spacing),
        structures=dict(spec.structures),
        variables=list(spec.variables),
        normalisation=fit_normalisation(spec.variables, train.tolist()),
        regions=dict(spec.regions),
    )


@functools.lru_cache(maxsize=8)
def _load(
    fmt: FileFormat, root_str: str, size: tuple[int, ...], fit: str, stamp: float
) -> tuple[Spec, Table, DatasetInfo]:
    root = Path(root_str)
    spec, table, shapes, problems = scan(root, False, functools.partial(check_files, fmt))
    if problems:
        raise_problems(problems, root)
    assert spec is not None and table is not None
    if size and len(size) != spec.spatial_dims:
        raise DatasetError(f"dataset {root}: size {list(size)} must have {spec.spatial_dims} entries (spatial_dims)")
    native = shapes[table.ids[table.splits.index("train")]]
    if not size:
        other = sorted({s for s in shapes.values() if s != native})
        if other:
            raise DatasetError(
                f"dataset {root}: images have different shapes {[native, *other[:3]]}; "
                "set the dataset size to resize or crop them"
            )
    target = tuple(size) if size else native
    if table.measured:
        m = measure(table, spec, functools.partial(measure_file, fmt, root, spec))
        table.values[:, table.measured] = m[:, table.measured]
    spacing = spec.spacing
    if fit == "resize":
        spacing = tuple(sp * n / t for sp, n, t in zip(spec.spacing, native, target))
    return spec, table, folder_info(spec, table, target, spacing)


def measure_file(fmt: FileFormat, root: Path, spec: Spec, sid: str) -> list[float]:
    """Physical area/volume of every structure variable of sample ``sid`` (NaN for the others),
    measured on its native mask: label count times the voxel size of ``spec.spacing``."""
    classes = read_file(fmt, root, spec, "masks", sid)
    regions = read_file(fmt, root, spec, "regions", sid) if spec.regions else None
    return measure_sample(classes, regions, spec, float(np.prod(spec.spacing)))


def load(
    fmt: FileFormat, path: str | Path, size: tuple[int, ...] = (), fit: str = "resize"
) -> tuple[Spec, Table, DatasetInfo]:
    """Spec, table and ``DatasetInfo`` of the folder at ``path`` in format ``fmt`` (cached until
    dataset.yaml or attributes.csv changes). Every image shares one shape unless ``size`` is set
    (then ``fit``: resize or crop); structure variables without a column are measured from the
    native masks (label count times ``spacing``). DatasetError listing the first problems."""
    if fit not in ("resize", "crop"):
        raise DatasetError(f"{path}: fit must be resize or crop, got {fit!r}")
    root = Path(path).expanduser().resolve()
    stamp = max((p.stat().st_mtime for p in (root / SPEC_FILE, root / CSV_FILE) if p.exists()), default=0.0)
    return _load(fmt, str(root), tuple(int(s) for s in size), fit, stamp)


class FolderDataset:
    """One split of a dataset folder; items are read from disk on access (so DataLoader workers
    share nothing but paths). Subclasses override ``sample`` to read a file differently."""

    def __init__(self, root: Path, spec: Spec, table: Table, info: DatasetInfo, split: str, **options: Any) -> None:
        import torch

        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
        self.root = Path(root)
        self.info = info
        self.split = split
        self._spec = spec
        self._options = options
        sel = [i for i, s in enumerate(table.splits) if s == split]
        self.ids = [table.ids[i] for i in sel]
        self._parents = (
            torch.from_numpy(info.normalise(table.values[sel])).float().reshape(len(sel), len(spec.variables))
        )
        self._positions = sel

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spec(self) -> Spec:
        """The dataset's ``dataset.yaml`` as read (intensity window, spacing, structures, variables)."""
        return self._spec

    def image_path(self, sid: str) -> Path:
        """The image file of subject ``sid`` (``images/<sid><suffix>``), inside the dataset folder."""
        return inside(self.root, "images", f"{sid}{self._options['fmt'].suffix}")

    def physical_parents(self) -> np.ndarray:
        """(N, P) physical variable values of the split (float64)."""
        return self.info.denormalise(self._parents.double().numpy())

    def read(self, folder: str, sid: str) -> Any:
        """File ``folder/<sid>`` as a tensor in its stored shape: images windowed to [-1, 1],
        labels as int64 (``read_file`` with the ``fmt`` option, a FileFormat)."""
        import torch

        arr = read_file(self._options["fmt"], self.root, self._spec, folder, sid)
        return torch.from_numpy(window(arr, self._spec) if folder == "images" else arr)

    def fit(self, t: Any, folder: str) -> Any:
        """Tensor ``t`` of ``folder`` brought to the dataset shape by the ``fit`` option."""
        if folder == "images":
            return fit_shape(t, self.info.shape, self._options["fit"], True, -1.0).clamp(-1.0, 1.0)
        return fit_shape(t, self.info.shape, self._options["fit"], False, 0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        sid = self.ids[i]
        folders = ("images", "masks") + (("regions",) if self._spec.regions else ())
        native = {f: self.read(f, sid) for f in folders}
        suffix = getattr(self._options.get("fmt"), "suffix", self._options.get("suffix", ""))
        for folder in folders[1:]:
            if native[folder].shape != native["images"].shape:
                raise DatasetError(
                    f"dataset {self.root}: {folder}/{sid}{suffix}: shape "
                    f"{tuple(native[folder].shape)} differs from the image shape {tuple(native['images'].shape)}"
                )
        item = {
            "image": self.fit(native["images"], "images").unsqueeze(0),
            "mask": self.fit(native["masks"], "masks"),
            "parents": self._parents[i],
            "index": torch.tensor(self._positions[i], dtype=torch.int64),
        }
        if self._spec.regions:
            item["regions"] = self.fit(native["regions"], "regions")
        return item


def build_split(
    fmt: FileFormat,
    path: str | Path,
    split: str,
    size: tuple[int, ...] = (),
    fit: str = "resize",
    dataset_class: type[FolderDataset] = FolderDataset,
) -> FolderDataset:
    """The ``split`` (train, val, test) of the folder at ``path`` in format ``fmt`` (see ``load``
    for ``size`` and ``fit``); DatasetError listing the first problems of a folder that does not
    meet the layout."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    if not str(path):
        raise DatasetError(f"{fmt.name} dataset: set path to the dataset folder (the one containing {SPEC_FILE})")
    spec, table, info = load(fmt, path, size, fit)
    return dataset_class(Path(path).expanduser().resolve(), spec, table, info, split, fmt=fmt, fit=fit)
