"""tiff: user datasets of 2D or 3D TIFF images, label masks and a CSV of variables.

Layout (nothing is ever written into this folder)::

    DATASET/dataset.yaml
    DATASET/images/<id>.tif      (H, W) or (D, H, W), any integer or float dtype
    DATASET/masks/<id>.tif       same shape, integer labels (0 background)
    DATASET/regions/<id>.tif     optional, same shape, integer region ids (0 outside)
    DATASET/attributes.csv       column ``id``, one column per variable, optional ``split``

dataset.yaml, attributes.csv, the splits and the label-to-class mapping are the
format-independent folder layer (segcft/data/folder.py, which documents the keys); this module
reads the TIFF files and serves the samples.

Files are read lazily per item, so datasets larger than memory work with DataLoader workers.
Every file is checked as it is read, not only by ``segcft data check``: at most MAX_VOXELS
voxels and ``spatial_dims`` axes (from the header, before decoding), inside the dataset folder
(no symlink or ``..`` out of it), finite image values and declared mask and region labels.
Masks load as class indices: 0 background, then the declared labels in increasing order
(``labels_to_classes``, the order of ``DatasetInfo.class_names``), so labels need not be 1..K.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.configs import TiffConfig
from segcft.data.folder import (
    CSV_FILE,
    SPEC_FILE,
    SPLIT_NAMES,
    BadValues,
    Problem,
    Spec,
    Table,
    _read_yaml,
    check_values,
    inside,
    measure_sample,
    raise_problems,
    window,
)
from segcft.data.folder import labels_to_classes as labels_to_classes  # re-exported: public name of this module
from segcft.data.folder import measure as folder_measure
from segcft.data.folder import scan as folder_scan
from segcft.data.imageio import ImageTooLarge, declared_shape, uncrop_pad
from segcft.data.variables import DatasetInfo, fit_normalisation
from segcft.errors import DatasetError


def _header(tf: Any) -> tuple[tuple[int, ...], np.dtype]:
    try:
        return declared_shape(tf)
    except ImageTooLarge as exc:
        raise BadValues(str(exc)) from None


def _tiff_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return _header(tf)


def _read_tiff(path: Path, dims: int) -> np.ndarray:
    """Decode a TIFF whose header declares a ``dims``-D array of at most MAX_VOXELS voxels:
    the header is checked first, so no oversized or mis-shaped file is ever decoded."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        shape, _ = _header(tf)
        if len(shape) != dims:
            raise BadValues(f"expected a {dims}D array (spatial_dims), got shape {shape}")
        arr = tf.series[0].asarray()
    if arr.size == 0:  # tifffile reads some corrupt headers as an empty array
        raise ValueError("no image data")
    return arr


def _decode(root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    return check_values(folder, _read_tiff(inside(root, folder, f"{sid}.tif"), spec.spatial_dims), spec)


def read_sample_file(root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    """File ``folder/<sid>.tif`` of a dataset, checked as it is read: images as finite float32
    values, masks as class indices (``labels_to_classes``), regions as declared ids (int64).
    DatasetError naming the file and the offending value for anything else."""
    try:
        return _decode(root, spec, folder, sid)
    except Exception as exc:  # tifffile raises many types on corrupt input
        what = "" if isinstance(exc, BadValues) else f"unreadable or corrupt TIFF ({type(exc).__name__}): "
        raise DatasetError(f"dataset {root}: {folder}/{sid}.tif: {what}{exc}".splitlines()[0]) from exc


def check_files(
    root: Path, spec: Spec, table: Table, problems: list[Problem], deep: bool
) -> dict[str, tuple[int, ...]]:
    """Check every image, mask and region file of the table (headers only unless ``deep``:
    then also decode them and check label values); returns the shape of each readable image."""
    shapes: dict[str, tuple[int, ...]] = {}
    folders = ["images", "masks"] + (["regions"] if spec.regions else [])
    listed = set(table.ids)
    if (root / "images").is_dir():
        for p in sorted((root / "images").glob("*.tif")):
            if p.stem not in listed:
                problems.append(Problem(f"image {p.stem!r} has no row in {CSV_FILE}", f"images/{p.name}"))
    else:
        problems.append(Problem("missing folder of images", "images"))
    for sid in table.ids:
        got: dict[str, tuple[int, ...]] = {}
        for folder in folders:
            rel = f"{folder}/{sid}.tif"
            try:
                p = inside(root, folder, f"{sid}.tif")
            except BadValues as exc:
                problems.append(Problem(str(exc), rel))
                continue
            if not p.is_file():
                if folder == "images":
                    problems.append(Problem(f"id {sid!r} in {CSV_FILE} has no image file", rel))
                else:
                    problems.append(Problem(f"missing {folder[:-1]} file for id {sid!r}", rel))
                continue
            try:
                shape, dtype = _tiff_header(p)
            except BadValues as exc:
                problems.append(Problem(str(exc), rel))
                continue
            except Exception as exc:  # tifffile raises many types on corrupt input
                problems.append(
                    Problem(f"unreadable or corrupt TIFF ({type(exc).__name__}: {exc})".splitlines()[0], rel)
                )
                continue
            if len(shape) != spec.spatial_dims:
                problems.append(
                    Problem(f"expected a {spec.spatial_dims}D array (spatial_dims), got shape {shape}", rel)
                )
                continue
            if folder != "images" and not np.issubdtype(dtype, np.integer):
                problems.append(Problem(f"{folder} must hold integer labels, got dtype {dtype}", rel))
                continue
            if folder == "images" and not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
                problems.append(Problem(f"images must be integer or float, got dtype {dtype}", rel))
                continue
            if deep:
                try:
                    _decode(root, spec, folder, sid)
                except BadValues as exc:
                    problems.append(Problem(str(exc), rel, key=exc.key))
                except Exception as exc:  # tifffile raises many types on corrupt input
                    problems.append(
                        Problem(f"unreadable or corrupt TIFF ({type(exc).__name__}: {exc})".splitlines()[0], rel)
                    )
            got[folder] = shape
        if "images" in got:
            shapes[sid] = got["images"]
            for folder in folders[1:]:
                if folder in got and got[folder] != got["images"]:
                    problems.append(
                        Problem(
                            f"shape {got[folder]} differs from the image shape {got['images']}", f"{folder}/{sid}.tif"
                        )
                    )
    return shapes


def _measure_one(root: Path, spec: Spec, sid: str) -> list[float]:
    """Physical area/volume of every structure variable, measured on the native mask."""
    classes = read_sample_file(root, spec, "masks", sid)
    regions = read_sample_file(root, spec, "regions", sid) if spec.regions else None
    return measure_sample(classes, regions, spec, float(np.prod(spec.spacing)))


def scan(root: Path, deep: bool) -> tuple[Spec | None, Table | None, dict[str, tuple[int, ...]], list[Problem]]:
    """Validate a dataset folder: spec, table and files. Reads only; writes nothing."""
    return folder_scan(root, deep, check_files)


def measure(root: Path, spec: Spec, table: Table) -> np.ndarray:
    """(N, P) measured structure variables (NaN for the others) of every sample."""
    return folder_measure(table, spec, functools.partial(_measure_one, root, spec))


@functools.lru_cache(maxsize=4)
def _load(
    root_str: str, size: tuple[int, ...], fit: str, stamp: float
) -> tuple[Spec, Table, DatasetInfo, tuple[int, ...]]:
    root = Path(root_str)
    spec, table, shapes, problems = scan(root, deep=False)
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
        m = measure(root, spec, table)
        table.values[:, table.measured] = m[:, table.measured]
    spacing = spec.spacing
    if fit == "resize":
        spacing = tuple(sp * n / t for sp, n, t in zip(spec.spacing, native, target))
    train = table.values[[s == "train" for s in table.splits]]
    info = DatasetInfo(
        name=spec.name,
        spatial_dims=spec.spatial_dims,
        shape=target,
        spacing=spacing,
        structures=dict(spec.structures),
        variables=list(spec.variables),
        normalisation=fit_normalisation(spec.variables, train.tolist()),
        regions=dict(spec.regions),
    )
    return spec, table, info, target


class TiffDataset:
    """One split of a TIFF dataset folder; items are read from disk on access."""

    def __init__(self, root: Path, spec: Spec, table: Table, info: DatasetInfo, split: str, fit: str) -> None:
        import torch

        self.root = root
        self.info = info
        self.split = split
        self._spec = spec
        self._fit = fit
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
        """The image file of subject ``sid`` (``images/<sid>.tif``)."""
        return inside(self.root, "images", f"{sid}.tif")

    def grid_to_file(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of the items' fit (resize or crop) for a map on the dataset grid (a
        difference, say) and a file of ``shape``: resized back, or un-cropped (0 where the crop cut it)."""
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.asarray(values, dtype=np.float64))
        if tuple(t.shape) == tuple(shape):
            return t.numpy()
        if self._fit == "resize":
            mode = "bilinear" if len(shape) == 2 else "trilinear"
            return F.interpolate(t[None, None], size=shape, mode=mode, align_corners=False)[0, 0].numpy()
        return uncrop_pad(t, tuple(shape)).numpy()

    def physical_parents(self) -> np.ndarray:
        """(N, P) physical variable values of the split (float64)."""
        return self.info.denormalise(self._parents.double().numpy())

    def _fit_shape(self, t: Any, linear: bool, fill: float) -> Any:
        import torch
        import torch.nn.functional as F

        target = self.info.shape
        if tuple(t.shape) == target:
            return t
        if self._fit == "resize":
            x = t[None, None].float()
            mode = ("bilinear" if len(target) == 2 else "trilinear") if linear else "nearest-exact"
            kw = {"align_corners": False} if linear else {}
            out = F.interpolate(x, size=target, mode=mode, **kw)[0, 0]
            return out if linear else out.round().to(t.dtype)
        out = torch.full(target, fill, dtype=t.dtype)
        src, dst = [], []
        for n, m in zip(t.shape, target):
            if n >= m:
                a = (n - m) // 2
                src.append(slice(a, a + m))
                dst.append(slice(0, m))
            else:
                a = (m - n) // 2
                src.append(slice(0, n))
                dst.append(slice(a, a + n))
        out[tuple(dst)] = t[tuple(src)]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        i = i % len(self)
        sid = self.ids[i]
        img = torch.from_numpy(window(read_sample_file(self.root, self._spec, "images", sid), self._spec))
        mask = torch.from_numpy(read_sample_file(self.root, self._spec, "masks", sid))
        regions = None
        if self._spec.regions:
            regions = torch.from_numpy(read_sample_file(self.root, self._spec, "regions", sid))
        for folder, t in (("masks", mask), ("regions", regions)):
            if t is not None and t.shape != img.shape:
                raise DatasetError(
                    f"dataset {self.root}: {folder}/{sid}.tif: shape {tuple(t.shape)} "
                    f"differs from the image shape {tuple(img.shape)}"
                )
        item = {
            "image": self._fit_shape(img, True, -1.0).clamp(-1.0, 1.0).unsqueeze(0),
            "mask": self._fit_shape(mask, False, 0),
            "parents": self._parents[i],
            "index": torch.tensor(self._positions[i], dtype=torch.int64),
        }
        if regions is not None:
            item["regions"] = self._fit_shape(regions, False, 0)
        return item


def dataset_dims(config: TiffConfig) -> int | None:
    """``spatial_dims`` of the folder's dataset.yaml, read without any image (config resolution
    uses it to apply a preset's 3D overlay); None when there is no such key yet (building the
    dataset then reports what is wrong)."""
    if not config.path:
        return None
    data = _read_yaml(Path(config.path).expanduser(), [])
    dims = data.get("spatial_dims") if data is not None else None
    return dims if dims in (2, 3) and not isinstance(dims, bool) else None


def build(config: TiffConfig, split: str) -> TiffDataset:
    """The ``split`` (train, val, test) of the TIFF dataset at ``config.path``; raises
    DatasetError listing the first problems when the folder does not meet the layout."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    if not config.path:
        raise DatasetError("tiff dataset: set path to the dataset folder (the one containing dataset.yaml)")
    if config.fit not in ("resize", "crop"):
        raise DatasetError(f"tiff dataset: fit must be resize or crop, got {config.fit!r}")
    root = Path(config.path).expanduser().resolve()
    spec_file = root / SPEC_FILE
    stamp = max((p.stat().st_mtime for p in (spec_file, root / CSV_FILE) if p.exists()), default=0.0)
    spec, table, info, _ = _load(str(root), tuple(int(s) for s in config.size), config.fit, stamp)
    return TiffDataset(root, spec, table, info, split, config.fit)
