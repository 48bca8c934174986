"""folder_spec: the dataset.yaml schema, the attributes.csv table, splits and labels of a dataset folder.

Part of the public folder layer (import it from ``segcft.data.folder``). Not tied to an image
format: ``read_spec`` validates ``dataset.yaml``, ``read_table`` the ``attributes.csv`` table of
samples (ids, splits, variable values), ``labels_to_classes`` maps mask labels to segmentation
classes, and every problem found becomes a ``Problem`` naming its file, CSV row or YAML key.

dataset.yaml keys: ``name``; ``spatial_dims`` (2 or 3); ``spacing`` (mm per axis, slowest
first; optional for NIfTI); ``intensity`` (``{min: a, max: b}`` window, or ``{percentiles: [lo, hi]}`` /
``auto`` = per-image percentiles 1 and 99); ``structures`` ``{label: name}``; ``regions``
``{id: name}`` (optional); ``variables`` ``{name: {type: binary|continuous, parents: [..],
unit: .., measure: {structure: NAME, region: NAME}}}``; ``splits`` ``{train: f, val: f,
test: f, seed: s}`` (used when the CSV has no ``split`` column). A structure variable without
a CSV column is measured from the masks (label count times voxel size).

attributes.csv: column ``id``, one column per variable, optional ``split``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data.variables import MAX_REGION_ID, Measure, Variable
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


def _read_spacing(raw_sp: Any, dims: int, problems: list[Problem]) -> tuple[float, ...]:
    """``spacing``: one positive number per axis (1 mm each when invalid, with a problem)."""
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
    return spacing


def _read_intensity(
    inten: Any, problems: list[Problem]
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """``intensity``: a fixed (min, max) window or per-image (lo, hi) percentiles."""
    window, pct = None, None
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
    return window, pct


def _read_measure(
    m: Any, key: str, structures: dict[int, str], regions: dict[int, str], problems: list[Problem]
) -> Measure | None:
    """``variables.<name>.measure``: a declared structure, optionally within a declared region."""
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
        return Measure(m["structure"], m.get("region"))
    return None


def _read_variable(
    vname: Any, v: Any, structures: dict[int, str], regions: dict[int, str], problems: list[Problem]
) -> Variable | None:
    """One entry of ``variables``; None (with a problem) when its type or shape is wrong."""
    key = f"variables.{vname}"
    if not isinstance(v, dict):
        problems.append(Problem("expected a mapping with type, parents, unit, measure", SPEC_FILE, key=key))
        return None
    vtype = v.get("type")
    if vtype not in ("binary", "continuous"):
        problems.append(Problem(f"type must be binary or continuous, got {vtype!r}", SPEC_FILE, key=f"{key}.type"))
        return None
    parents = v.get("parents") or []
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        problems.append(
            Problem(f"parents must be a list of variable names, got {parents!r}", SPEC_FILE, key=f"{key}.parents")
        )
        parents = []
    measure = None
    if v.get("measure") is not None:
        measure = _read_measure(v["measure"], key, structures, regions, problems)
    return Variable(str(vname), vtype, tuple(parents), str(v.get("unit", "")), measure)


def _check_graph(variables: list[Variable], problems: list[Problem], before: int) -> None:
    """Every parent is a declared variable and the variables form no cycle (checked only when
    no parent problem was found since ``problems[before]``)."""
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


def _read_splits(raw_split: Any, problems: list[Problem]) -> tuple[tuple[float, float, float], int]:
    """``splits``: train/val/test fractions (normalised to sum 1) and the hash seed."""
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
    return fr, seed


def read_spec(root: Path, problems: list[Problem], spacing_optional: bool = False) -> Spec | None:
    """Parse and validate dataset.yaml, appending every problem found; None when unusable.
    ``spacing_optional``: a missing ``spacing`` gives an empty tuple (formats whose files carry
    their own geometry, such as NIfTI, then pick a common spacing themselves)."""
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
    if spacing_optional and data.get("spacing") is None:
        spacing: tuple[float, ...] = ()
    else:
        spacing = _read_spacing(data.get("spacing"), dims, problems)
    window, pct = _read_intensity(data.get("intensity", "auto"), problems)

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
        var = _read_variable(vname, v, structures, regions, problems)
        if var is not None:
            variables.append(var)
    _check_graph(variables, problems, before)

    fr, seed = _read_splits(data.get("splits") or {}, problems)
    if len(problems) > before:
        return None
    return Spec(name, dims, spacing, window, pct, structures, regions, variables, fr, seed)


def _hash_split(seed: int, sample_id: str, fractions: tuple[float, float, float]) -> str:
    h = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2.0**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _read_rows(root: Path, problems: list[Problem]) -> list[list[str]] | None:
    """The rows of attributes.csv (header first); None (with a problem) when missing, unreadable or empty."""
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
    return rows


def _read_header(header: list[str], spec: Spec, problems: list[Problem]) -> tuple[dict[str, int], list[int]] | None:
    """The column of each name and the indices of the variables to measure from the masks;
    None when the header has no id column or repeats a column."""
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
    return col, measured


def _read_values(r: list[str], line: int, col: dict[str, int], spec: Spec, problems: list[Problem]) -> list[float]:
    """The variable values of one row (NaN where missing or invalid, with a problem when invalid)."""
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
    return vals


def read_table(root: Path, spec: Spec, problems: list[Problem]) -> Table | None:
    """Parse attributes.csv against the spec, appending every problem; the table holds every
    row with a valid id (so files can still be checked), None when there is none."""
    rows = _read_rows(root, problems)
    if rows is None:
        return None
    header = [h.strip() for h in rows[0]]
    got = _read_header(header, spec, problems)
    if got is None:
        return None
    col, measured = got
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
        vals = _read_values(r, line, col, spec, problems)
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


def raise_problems(problems: list[Problem], root: Path) -> None:
    """DatasetError listing the first problems of the dataset at ``root`` (all: `segcft data check`)."""
    shown = "; ".join(str(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more; run `segcft data check {root}`)" if len(problems) > 3 else ""
    raise DatasetError(f"dataset {root}: {shown}{more}")
