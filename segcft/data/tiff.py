"""tiff: user datasets of 2D or 3D TIFF images, label masks and a CSV of variables.

Layout (nothing is ever written into this folder)::

    DATASET/dataset.yaml
    DATASET/images/<id>.tif      (H, W) or (D, H, W), any integer or float dtype
    DATASET/masks/<id>.tif       same shape, integer labels (0 background)
    DATASET/regions/<id>.tif     optional, same shape, integer region ids (0 outside)
    DATASET/attributes.csv       column ``id``, one column per variable, optional ``split``

dataset.yaml keys: ``name``; ``spatial_dims`` (2 or 3); ``spacing`` (mm per axis, slowest
first); ``intensity`` (``{min: a, max: b}`` window, or ``{percentiles: [lo, hi]}`` /
``auto`` = per-image percentiles 1 and 99); ``structures`` ``{label: name}``; ``regions``
``{id: name}`` (optional); ``variables`` ``{name: {type: binary|continuous, parents: [..],
unit: .., measure: {structure: NAME, region: NAME}}}``; ``splits`` ``{train: f, val: f,
test: f, seed: s}`` (used when the CSV has no ``split`` column). A structure variable without
a CSV column is measured from the masks (label count times voxel size).

Files are read lazily per item, so datasets larger than memory work with DataLoader workers.
Every file is checked as it is read, not only by ``segcft data check``: at most MAX_VOXELS
voxels and ``spatial_dims`` axes (from the header, before decoding), inside the dataset folder
(no symlink or ``..`` out of it), finite image values and declared mask and region labels.
Masks load as class indices: 0 background, then the declared labels in increasing order
(``labels_to_classes``, the order of ``DatasetInfo.class_names``), so labels need not be 1..K.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.configs import TiffConfig
from segcft.data.variables import MAX_REGION_ID, DatasetInfo, Measure, Variable, fit_normalisation
from segcft.errors import DatasetError

SPEC_FILE = "dataset.yaml"
CSV_FILE = "attributes.csv"
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder: the file (relative to the folder), the CSV row
    (line number, header = 1) or the YAML key it concerns, and what was expected."""

    message: str
    file: str | None = None
    row: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.file or ""
        if self.row is not None:
            where += f":{self.row}"
        if self.key:
            where += f" [{self.key}]"
        return f"{where}: {self.message}" if where else self.message


@dataclass
class Spec:
    """dataset.yaml, validated."""

    name: str
    spatial_dims: int
    spacing: tuple[float, ...]
    window: tuple[float, float] | None
    percentiles: tuple[float, float] | None
    structures: dict[int, str]
    regions: dict[int, str]
    variables: list[Variable]
    split_fractions: tuple[float, float, float]
    split_seed: int


@dataclass
class Table:
    """The samples of a dataset folder: ids, their split and their physical variable values
    (NaN where a structure variable is to be measured from the masks)."""

    ids: list[str]
    splits: list[str]
    values: np.ndarray  # (N, P) float64
    measured: list[int] = field(default_factory=list)  # variable indices measured from masks


def _read_yaml(root: Path, problems: list[Problem]) -> dict[str, Any] | None:
    import yaml

    path = root / SPEC_FILE
    if not path.is_file():
        problems.append(Problem(f"missing (expected the dataset description in {root})", SPEC_FILE))
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "unreadable YAML"
        problems.append(Problem(f"{what}: {exc}".splitlines()[0], SPEC_FILE))
        return None
    if not isinstance(data, dict):
        problems.append(Problem("expected a mapping of keys at the top level", SPEC_FILE))
        return None
    return data


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _id_map(
    raw: Any, key: str, problems: list[Problem], allow_zero: bool = False, top: int = 2**31 - 1
) -> dict[int, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(Problem("expected a mapping {id: name}", SPEC_FILE, key=key))
        return {}
    out: dict[int, str] = {}
    for k, v in raw.items():
        try:
            if isinstance(k, (bool, float)):
                raise TypeError(k)
            i = int(k)
        except (TypeError, ValueError):
            problems.append(Problem(f"id {k!r} is not an integer", SPEC_FILE, key=f"{key}.{k}"))
            continue
        if not (0 if allow_zero else 1) <= i <= top or not isinstance(v, str) or not v:
            problems.append(
                Problem(f"expected an id in [1, {top}] mapped to a name, got {k!r}: {v!r}", SPEC_FILE, key=f"{key}.{k}")
            )
            continue
        out[i] = v
    if len(set(out.values())) != len(out):
        problems.append(Problem(f"duplicate names in {sorted(out.values())}", SPEC_FILE, key=key))
    return out


def read_spec(root: Path, problems: list[Problem]) -> Spec | None:
    """Parse and validate dataset.yaml, appending every problem found; None when unusable."""
    data = _read_yaml(root, problems)
    if data is None:
        return None
    before = len(problems)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append(Problem("expected a non-empty string", SPEC_FILE, key="name"))
        name = root.name
    dims = data.get("spatial_dims")
    if dims not in (2, 3):
        problems.append(Problem(f"expected 2 or 3, got {dims!r}", SPEC_FILE, key="spatial_dims"))
        dims = 2
    raw_sp = data.get("spacing")
    spacing: tuple[float, ...] = (1.0,) * dims
    if not isinstance(raw_sp, (list, tuple)) or len(raw_sp) != dims:
        problems.append(
            Problem(
                f"expected a list of {dims} spacings in mm (slowest axis first), got {raw_sp!r}",
                SPEC_FILE,
                key="spacing",
            )
        )
    else:
        vals = [_number(s) for s in raw_sp]
        if any(v is None or v <= 0 for v in vals):
            problems.append(Problem(f"every spacing must be a number > 0, got {raw_sp!r}", SPEC_FILE, key="spacing"))
        else:
            spacing = tuple(float(v) for v in vals)  # type: ignore[arg-type]

    window, pct = None, None
    inten = data.get("intensity", "auto")
    if inten == "auto":
        pct = (1.0, 99.0)
    elif isinstance(inten, dict) and "percentiles" in inten:
        p = inten["percentiles"]
        vals = [_number(v) for v in p] if isinstance(p, (list, tuple)) and len(p) == 2 else [None]
        if any(v is None for v in vals) or not 0 <= vals[0] < vals[1] <= 100:  # type: ignore[operator]
            problems.append(
                Problem(
                    f"expected [lo, hi] with 0 <= lo < hi <= 100, got {p!r}", SPEC_FILE, key="intensity.percentiles"
                )
            )
        else:
            pct = (float(vals[0]), float(vals[1]))  # type: ignore[arg-type]
    elif isinstance(inten, dict) and {"min", "max"} <= set(inten):
        lo, hi = _number(inten["min"]), _number(inten["max"])
        if lo is None or hi is None or hi <= lo:
            problems.append(Problem(f"expected numbers with min < max, got {inten!r}", SPEC_FILE, key="intensity"))
        else:
            window = (lo, hi)
    else:
        problems.append(
            Problem(
                f"expected {{min: a, max: b}}, {{percentiles: [lo, hi]}} or auto, got {inten!r}",
                SPEC_FILE,
                key="intensity",
            )
        )

    structures = _id_map(data.get("structures"), "structures", problems)
    if not structures and "structures" not in data:
        problems.append(
            Problem("expected a mapping {label: name} with at least one structure", SPEC_FILE, key="structures")
        )
    regions = _id_map(data.get("regions"), "regions", problems, top=MAX_REGION_ID)

    variables: list[Variable] = []
    raw_vars = data.get("variables")
    if not isinstance(raw_vars, dict) or not raw_vars:
        problems.append(
            Problem("expected a mapping {name: {type, parents, unit, measure}}", SPEC_FILE, key="variables")
        )
        raw_vars = {}
    for vname, v in raw_vars.items():
        key = f"variables.{vname}"
        if not isinstance(v, dict):
            problems.append(Problem("expected a mapping with type, parents, unit, measure", SPEC_FILE, key=key))
            continue
        vtype = v.get("type")
        if vtype not in ("binary", "continuous"):
            problems.append(Problem(f"type must be binary or continuous, got {vtype!r}", SPEC_FILE, key=f"{key}.type"))
            continue
        parents = v.get("parents") or []
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            problems.append(
                Problem(f"parents must be a list of variable names, got {parents!r}", SPEC_FILE, key=f"{key}.parents")
            )
            parents = []
        measure = None
        if v.get("measure") is not None:
            m = v["measure"]
            if not isinstance(m, dict) or m.get("structure") not in structures.values():
                problems.append(
                    Problem(
                        f"measure.structure must be one of {sorted(structures.values())}, got {m!r}",
                        SPEC_FILE,
                        key=f"{key}.measure",
                    )
                )
            elif m.get("region") is not None and m["region"] not in regions.values():
                problems.append(
                    Problem(
                        f"measure.region must be one of {sorted(regions.values())}, got {m['region']!r}",
                        SPEC_FILE,
                        key=f"{key}.measure",
                    )
                )
            else:
                measure = Measure(m["structure"], m.get("region"))
        variables.append(Variable(str(vname), vtype, tuple(parents), str(v.get("unit", "")), measure))
    names = [v.name for v in variables]
    for v in variables:
        for p in v.parents:
            if p not in names:
                problems.append(
                    Problem(f"unknown parent {p!r}; known: {names}", SPEC_FILE, key=f"variables.{v.name}.parents")
                )
    if not any(p.key and p.key.endswith(".parents") for p in problems[before:]):
        done: list[str] = []
        remaining = list(variables)
        while remaining:
            ready = [v for v in remaining if all(p in done for p in v.parents)]
            if not ready:
                problems.append(
                    Problem(f"the variables {[v.name for v in remaining]} form a cycle", SPEC_FILE, key="variables")
                )
                break
            done += [v.name for v in ready]
            remaining = [v for v in remaining if v.name not in done]

    raw_split = data.get("splits") or {}
    fr = (0.8, 0.1, 0.1)
    seed = 0
    if not isinstance(raw_split, dict):
        problems.append(Problem("expected {train: f, val: f, test: f, seed: s}", SPEC_FILE, key="splits"))
    else:
        vals = [_number(raw_split.get(s, d)) for s, d in zip(SPLIT_NAMES, fr)]
        nums = [v for v in vals if v is not None]
        if len(nums) < len(vals) or any(v < 0 for v in nums) or sum(nums) <= 0:
            problems.append(
                Problem(
                    f"split fractions must be numbers >= 0 with a positive sum, got {raw_split!r}",
                    SPEC_FILE,
                    key="splits",
                )
            )
        else:
            total = sum(nums)
            train, val, test = nums
            fr = (train / total, val / total, test / total)
        s = raw_split.get("seed", 0)
        if isinstance(s, bool) or not isinstance(s, int):
            problems.append(Problem(f"seed must be an integer, got {s!r}", SPEC_FILE, key="splits.seed"))
        else:
            seed = s
    if len(problems) > before:
        return None
    return Spec(name, dims, spacing, window, pct, structures, regions, variables, fr, seed)


def _hash_split(seed: int, sample_id: str, fractions: tuple[float, float, float]) -> str:
    h = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2.0**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def read_table(root: Path, spec: Spec, problems: list[Problem]) -> Table | None:
    """Parse attributes.csv against the spec, appending every problem; the table holds every
    row with a valid id (so files can still be checked), None when there is none."""
    path = root / CSV_FILE
    if not path.is_file():
        problems.append(Problem("missing (expected a CSV with an id column and one column per variable)", CSV_FILE))
        return None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "unreadable CSV"
        problems.append(Problem(f"{what}: {exc}", CSV_FILE))
        return None
    if not rows:
        problems.append(Problem("empty file (expected a header row)", CSV_FILE))
        return None
    header = [h.strip() for h in rows[0]]
    if "id" not in header:
        problems.append(Problem(f"no 'id' column in the header {header}", CSV_FILE, row=1, key="id"))
        return None
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        problems.append(
            Problem(
                f"duplicate columns {dups} in the header (expected one column per name)", CSV_FILE, row=1, key=dups[0]
            )
        )
        return None
    col = {h: i for i, h in enumerate(header)}
    measured = []
    for j, v in enumerate(spec.variables):
        if v.name not in col:
            if v.measure is None:
                problems.append(
                    Problem(
                        f"no column for variable {v.name!r} (only structure variables can be measured from masks)",
                        CSV_FILE,
                        row=1,
                        key=v.name,
                    )
                )
            else:
                measured.append(j)
    ids: list[str] = []
    splits: list[str] = []
    values = []
    seen: dict[str, int] = {}
    for line, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) != len(header):
            problems.append(Problem(f"expected {len(header)} fields, got {len(r)}", CSV_FILE, row=line))
            continue
        sid = r[col["id"]].strip()
        if not sid or sid in (".", "..") or any(c in sid for c in "/\\\0"):
            problems.append(Problem(f"invalid id {sid!r}", CSV_FILE, row=line, key="id"))
            continue
        if sid in seen:
            problems.append(Problem(f"duplicate id {sid!r} (first on line {seen[sid]})", CSV_FILE, row=line, key="id"))
            continue
        seen[sid] = line
        vals = []
        for v in spec.variables:
            if v.name not in col:
                vals.append(float("nan"))
                continue
            raw = r[col[v.name]].strip()
            x = _number(raw)
            if x is None:
                problems.append(Problem(f"expected a finite number, got {raw!r}", CSV_FILE, row=line, key=v.name))
            elif v.type == "binary" and x not in (0.0, 1.0):
                problems.append(Problem(f"binary variable must be 0 or 1, got {raw!r}", CSV_FILE, row=line, key=v.name))
            vals.append(float("nan") if x is None else x)
        if "split" in col:
            s = r[col["split"]].strip()
            if s not in SPLIT_NAMES:
                problems.append(
                    Problem(f"split must be one of {list(SPLIT_NAMES)}, got {s!r}", CSV_FILE, row=line, key="split")
                )
        else:
            s = _hash_split(spec.split_seed, sid, spec.split_fractions)
        ids.append(sid)
        splits.append(s)
        values.append(vals)
    if not ids:
        problems.append(Problem("no samples (expected one row per image)", CSV_FILE))
        return None
    return Table(ids, splits, np.asarray(values, dtype=np.float64).reshape(len(ids), len(spec.variables)), measured)


def class_labels(structures: dict[int, str]) -> np.ndarray:
    """The mask label of each segmentation class: 0 (background), then the labels declared in
    ``structures`` in increasing order, the order of ``DatasetInfo.class_names``."""
    return np.asarray([0, *sorted(structures)], dtype=np.int64)


def labels_to_classes(mask: np.ndarray, structures: dict[int, str]) -> np.ndarray:
    """Class index (0 background, 1..K) of every voxel of a label mask, int64: the one place
    where mask labels become classes (loading, check, measure, show and training use it).
    ValueError naming the values that are not declared in ``structures`` (negative ones too)."""
    labels = class_labels(structures)
    idx = np.searchsorted(labels, mask)
    ok = labels[np.minimum(idx, len(labels) - 1)] == mask
    if not ok.all():
        bad = np.unique(mask[~ok])[:10].tolist()
        raise ValueError(f"labels {bad} are not declared in structures of {SPEC_FILE} (declared: {labels.tolist()})")
    return idx.astype(np.int64)


MAX_VOXELS = 2**28  # largest image, mask or region file decoded (1 GiB as float32)


class _BadValues(ValueError):
    """A file whose header or values break the contract (as opposed to an unreadable file);
    ``key`` is the dataset.yaml key the values are checked against, if any."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _header(tf: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not tf.series or 0 in tf.series[0].shape:
        raise ValueError("no image data")
    s = tf.series[0]
    shape = tuple(int(x) for x in s.shape)
    if math.prod(shape) > MAX_VOXELS:
        raise _BadValues(f"shape {shape} has {math.prod(shape)} voxels, more than the limit of {MAX_VOXELS} (2**28)")
    return shape, np.dtype(s.dtype)


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
            raise _BadValues(f"expected a {dims}D array (spatial_dims), got shape {shape}")
        arr = tf.series[0].asarray()
    if arr.size == 0:  # tifffile reads some corrupt headers as an empty array
        raise ValueError("no image data")
    return arr


def _inside(root: Path, folder: str, sid: str) -> Path:
    """The resolved path of ``folder/<sid>.tif``; _BadValues when it resolves (through a
    symlink or ``..``) outside the dataset folder, so a dataset only makes segcft read its own files."""
    path = (root / folder / f"{sid}.tif").resolve()
    if root.resolve() not in path.parents:
        raise _BadValues(f"resolves to {path}, outside the dataset folder {root}")
    return path


def _decode(root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    arr = _read_tiff(_inside(root, folder, sid), spec.spatial_dims)
    if folder == "images":
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise _BadValues(f"images must be integer or float, got dtype {arr.dtype}")
        with np.errstate(over="ignore"):
            out = arr.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise _BadValues(f"image contains NaN or infinite values (as float32), e.g. {arr[at]} at voxel {at}")
        return out
    if not np.issubdtype(arr.dtype, np.integer):
        raise _BadValues(f"{folder} must hold integer labels, got dtype {arr.dtype}")
    if folder == "masks":
        try:
            return labels_to_classes(arr, spec.structures)
        except ValueError as exc:
            raise _BadValues(str(exc), key="structures") from None
    allowed = np.asarray([0, *sorted(spec.regions)], dtype=np.int64)
    bad_ids = np.unique(arr[~np.isin(arr, allowed)])[:10].tolist()
    if bad_ids:
        raise _BadValues(
            f"labels {bad_ids} are not declared in regions of {SPEC_FILE} (declared: {allowed.tolist()})", key="regions"
        )
    return arr.astype(np.int64)


def read_sample_file(root: Path, spec: Spec, folder: str, sid: str) -> np.ndarray:
    """File ``folder/<sid>.tif`` of a dataset, checked as it is read: images as finite float32
    values, masks as class indices (``labels_to_classes``), regions as declared ids (int64).
    DatasetError naming the file and the offending value for anything else."""
    try:
        return _decode(root, spec, folder, sid)
    except Exception as exc:  # tifffile raises many types on corrupt input
        what = "" if isinstance(exc, _BadValues) else f"unreadable or corrupt TIFF ({type(exc).__name__}): "
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
                p = _inside(root, folder, sid)
            except _BadValues as exc:
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
            except _BadValues as exc:
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
                except _BadValues as exc:
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
    voxel = float(np.prod(spec.spacing))
    classes = read_sample_file(root, spec, "masks", sid)
    regions = read_sample_file(root, spec, "regions", sid) if spec.regions else None
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
        out.append(float(sel.sum()) * voxel)
    return out


def scan(root: Path, deep: bool) -> tuple[Spec | None, Table | None, dict[str, tuple[int, ...]], list[Problem]]:
    """Validate a dataset folder: spec, table and files. Reads only; writes nothing."""
    problems: list[Problem] = []
    if not root.is_dir():
        return None, None, {}, [Problem(f"not a dataset folder (expected a directory with {SPEC_FILE})", str(root))]
    spec = read_spec(root, problems)
    table = read_table(root, spec, problems) if spec is not None else None
    shapes: dict[str, tuple[int, ...]] = {}
    if spec is not None and table is not None:
        shapes = check_files(root, spec, table, problems, deep)
        if not any(s == "train" for s in table.splits):
            problems.append(
                Problem("no sample in the train split (normalisation is fitted on it)", CSV_FILE, key="split")
            )
    return spec, table, shapes, problems


def measure(root: Path, spec: Spec, table: Table) -> np.ndarray:
    """(N, P) measured structure variables (NaN for the others) of every sample."""
    return np.asarray([_measure_one(root, spec, sid) for sid in table.ids], dtype=np.float64).reshape(
        len(table.ids), len(spec.variables)
    )


def _raise(problems: list[Problem], root: Path) -> None:
    shown = "; ".join(str(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more; run `segcft data check {root}`)" if len(problems) > 3 else ""
    raise DatasetError(f"dataset {root}: {shown}{more}")


@functools.lru_cache(maxsize=4)
def _load(
    root_str: str, size: tuple[int, ...], fit: str, stamp: float
) -> tuple[Spec, Table, DatasetInfo, tuple[int, ...]]:
    root = Path(root_str)
    spec, table, shapes, problems = scan(root, deep=False)
    if problems:
        _raise(problems, root)
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

    def physical_parents(self) -> np.ndarray:
        """(N, P) physical variable values of the split (float64)."""
        return self.info.denormalise(self._parents.double().numpy())

    def _window(self, arr: np.ndarray) -> np.ndarray:
        a = arr.astype(np.float32)
        if self._spec.window is not None:
            lo, hi = self._spec.window
        else:
            lo, hi = (float(v) for v in np.percentile(a, self._spec.percentiles))  # type: ignore[arg-type]
            if hi <= lo:
                hi = lo + 1.0
        return np.clip((a - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)

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
        img = torch.from_numpy(self._window(read_sample_file(self.root, self._spec, "images", sid)))
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
