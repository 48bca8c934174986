"""tiff: user datasets of 2D or 3D TIFF images, label masks and a CSV of variables.

Layout (nothing is ever written into this folder)::

    DATASET/dataset.yaml
    DATASET/images/<id>.tif      (H, W) or (D, H, W), any integer or float dtype
    DATASET/masks/<id>.tif       same shape, integer labels (0 background)
    DATASET/regions/<id>.tif     optional, same shape, integer region ids (0 outside)
    DATASET/attributes.csv       column ``id``, one column per variable, optional ``split``

dataset.yaml, attributes.csv, the splits, the label-to-class mapping, the file checks and the
Dataset class are the format-independent folder layer (segcft/data/folder.py); this module only
says how a TIFF file is read (``TIFF``, a ``FileFormat``).

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
from typing import cast

import numpy as np

from segcft.data.configs import TiffConfig
from segcft.data.folder import (
    BadValues,
    FileFormat,
    FolderDataset,
    Problem,
    Spec,
    Table,
    _read_yaml,
    build_split,
    check_folder,
    measure_file,
    read_file,
    resize,
    uncrop_pad,
)
from segcft.data.folder import check_files as folder_check_files
from segcft.data.folder import labels_to_classes as labels_to_classes  # re-exported: public name of this module
from segcft.data.folder import measure as folder_measure
from segcft.data.folder import scan as folder_scan
from segcft.data.imageio import ImageTooLarge, declared_shape
from segcft.errors import DatasetError


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the TIFF header (no voxel decoded); BadValues when over MAX_VOXELS."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        try:
            return declared_shape(tf)
        except ImageTooLarge as exc:
            raise BadValues(str(exc)) from None


def _read(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return tf.series[0].asarray()


TIFF = FileFormat("TIFF", ".tif", _header, _read)
"""How the ``tiff`` format reads its files."""


def read_sample_file(root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    """File ``folder/<sid>.tif`` of a dataset, checked as it is read: images as finite float32
    values, masks as class indices (``labels_to_classes``), regions as declared ids (int64).
    DatasetError naming the file and the offending value for anything else."""
    return read_file(TIFF, root, spec, folder, sid)


def check_files(
    root: Path, spec: Spec, table: Table, problems: list[Problem], deep: bool
) -> dict[str, tuple[int, ...]]:
    """Check every image, mask and region file of the table (headers only unless ``deep``:
    then also decode them and check label values); returns the shape of each readable image."""
    return folder_check_files(TIFF, root, spec, table, problems, deep)


def scan(root: Path, deep: bool) -> tuple[Spec | None, Table | None, dict[str, tuple[int, ...]], list[Problem]]:
    """Validate a dataset folder: spec, table and files. Reads only; writes nothing."""
    return folder_scan(root, deep, check_files)


def measure(root: Path, spec: Spec, table: Table) -> np.ndarray:
    """(N, P) measured structure variables (NaN for the others) of every sample."""
    return folder_measure(table, spec, functools.partial(measure_file, TIFF, root, spec))


class TiffDataset(FolderDataset):
    """One split of a TIFF dataset folder; items are read from disk on access."""

    def grid_to_file(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The inverse of the items' fit (resize or crop) for a map on the dataset grid (a
        difference, say) and a file of ``shape``: resized back, or un-cropped (0 where the crop cut it)."""
        import torch

        t = torch.from_numpy(np.asarray(values, dtype=np.float64))
        if tuple(t.shape) == tuple(shape):
            return t.numpy()
        if self._options["fit"] == "resize":
            return resize(t, tuple(shape), True).numpy()
        return uncrop_pad(t, tuple(shape)).numpy()


def check(config: TiffConfig) -> list[Problem]:
    """Every problem of the folder at ``config.path`` (layout, dataset.yaml, CSV, each file decoded)."""
    return check_folder(TIFF, config.path)


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
    if config.fit not in ("resize", "crop"):
        raise DatasetError(f"tiff dataset: fit must be resize or crop, got {config.fit!r}")
    size = tuple(int(s) for s in config.size)
    return cast(TiffDataset, build_split(TIFF, config.path, split, size, config.fit, TiffDataset))
