"""Dataset tools behind `segcft data check|measure|export|show`, for every registered dataset.

A dataset is named (``--dataset NAME`` with its config, ``--set`` applied) or given as a folder,
whose format is recognised by its images (``images/*.tif``: ``tiff``; ``images/*.nii[.gz]``:
``nifti``). None of the tools writes into a dataset folder: check and show only read, measure
and export write to a new location given by the user.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data import nifti, tiff
from segcft.data.export import FORMATS, split_counts, write_folder
from segcft.data.folder import CSV_FILE, SPEC_FILE, SPLIT_NAMES, Problem
from segcft.errors import DatasetError, UserError

__all__ = [
    "FORMATS",
    "Problem",
    "check_dataset",
    "detect_format",
    "export_dataset",
    "exported_counts",
    "measure_dataset",
    "resolve_dataset",
    "show_dataset",
    "split_counts",
]

_FOLDER_MODULES: dict[str, Any] = {"tiff": tiff, "nifti": nifti}
"""The built-in folder formats: their module's ``scan`` and ``measure`` work on the native files."""


def detect_format(path: str | Path) -> str:
    """The folder format of a dataset folder, from its images: ``tiff`` (images/*.tif) or
    ``nifti`` (images/*.nii or *.nii.gz). UserError saying what was found otherwise."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (expected a dataset folder with {SPEC_FILE} and images/)")
    names = [p.name for p in (root / "images").iterdir()] if (root / "images").is_dir() else []
    tif = sum(n.endswith(".tif") for n in names)
    nii = sum(n.endswith(nifti.SUFFIXES) for n in names)
    if tif and not nii:
        return "tiff"
    if nii and not tif:
        return "nifti"
    found = [f"{SPEC_FILE} {'present' if (root / SPEC_FILE).is_file() else 'missing'}"]
    if not (root / "images").is_dir():
        found.append("no images/ folder")
    else:
        found.append(f"images/ with {tif} .tif, {nii} .nii/.nii.gz and {len(names) - tif - nii} other files")
    raise UserError(
        f"{root}: not a dataset folder of a known format: found {', '.join(found)}; expected {SPEC_FILE} and "
        "images/*.tif (tiff) or images/*.nii[.gz] (nifti), or name the dataset with --dataset"
    )


def resolve_dataset(
    source: str | Path | None = None, dataset: str | None = None, overrides: tuple[str, ...] = ()
) -> tuple[str, Any]:
    """(dataset name, config) of ``--dataset NAME`` with ``--set KEY=VALUE`` overrides (checked
    like ``segcft train --set dataset.KEY=VALUE``), or of a folder ``source`` (its format by its
    contents; with ``--dataset``, the folder becomes that dataset's ``path``), or of a name."""
    from segcft.config import component_params

    folder = Path(source).expanduser() if source is not None else None
    if dataset is None:
        if folder is None:
            raise UserError("give a dataset folder or --dataset NAME")
        if folder.is_dir():
            dataset = detect_format(folder)
        elif folder.exists():
            detect_format(folder)
        else:
            dataset, folder = str(source), None
    assert dataset is not None
    config = component_params("dataset", dataset, overrides)
    if folder is not None:
        if not any(f.name == "path" for f in dataclasses.fields(config)):
            raise UserError(f"--dataset {dataset}: takes no dataset folder (its config has no path), got {folder}")
        config = dataclasses.replace(config, path=str(folder.resolve()))
    return dataset, config


def _resolve(source: str | Path, config: Any) -> tuple[str, Any]:
    """(name, config) for the library calls: a folder path or a name with ``config`` (None: defaults)."""
    if config is not None:
        return str(source), config
    if Path(source).expanduser().is_dir():
        name = detect_format(source)
        return name, dataclasses.replace(_factory(name, None)[1], path=str(Path(source).expanduser().resolve()))
    return str(source), _factory(str(source), None)[1]


def _factory(name: str, config: Any) -> tuple[Callable[[Any, str], Any], Any]:
    """The dataset's build function and its config (default config when ``config`` is None)."""
    from segcft.plugins import get_registry

    entry = get_registry().get("dataset", name)
    return entry.load(), config if config is not None else entry.config()


def _own_check(name: str, config: Any) -> list[Problem]:
    """The problems the dataset plugin's optional ``check(config)`` reports (next to its factory)."""
    from segcft.config.resolve import dataset_function

    check = dataset_function(name, "check")
    if check is None:
        return []
    try:
        found = list(check(config))
    except Exception as exc:  # a failing check is reported like any problem, not as a crash
        return [Problem(f"the dataset's own check failed: {type(exc).__name__}: {exc}".splitlines()[0])]
    return [p if isinstance(p, Problem) else Problem(str(p)) for p in found]


def _item_problems(item: Any, info: Any) -> list[str]:
    """What is wrong with one sample dict against the dataset contract (docs/design.md, "The batch")."""
    import torch

    missing = [k for k in ("image", "mask", "parents", "index") if k not in item]
    if missing or (info.regions and "regions" not in item):
        return [f"missing keys {missing or ['regions']} (has {sorted(item)})"]
    out = []
    shape, img = tuple(info.shape), item["image"]
    if tuple(img.shape) != (1, *shape) or img.dtype != torch.float32:
        out.append(f"image: expected float32 of shape {(1, *shape)}, got {img.dtype} {tuple(img.shape)}")
    elif not bool(torch.isfinite(img).all()) or float(img.min()) < -1 or float(img.max()) > 1:
        out.append(f"image: values must be finite and in [-1, 1], got [{float(img.min()):.4g}, {float(img.max()):.4g}]")
    labels = (("mask", len(info.class_names)),) + ((("regions", info.num_regions),) if info.regions else ())
    for key, top in labels:
        t = item[key]
        if tuple(t.shape) != shape or t.dtype != torch.int64:
            out.append(f"{key}: expected int64 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        elif int(t.min()) < 0 or int(t.max()) >= top:
            out.append(f"{key}: labels must lie in [0, {top}), got [{int(t.min())}, {int(t.max())}]")
    pa = item["parents"]
    if tuple(pa.shape) != (len(info.variables),) or not bool(torch.isfinite(pa).all()):
        out.append(f"parents: expected {len(info.variables)} finite values, got {pa.tolist()}")
    else:
        for v, x in zip(info.variables, pa.tolist()):
            if v.type == "binary" and x not in (0.0, 1.0):
                out.append(f"parents: binary variable {v.name} must be 0 or 1, got {x}")
    return out


def _generic_problems(name: str, config: Any, samples: int) -> list[Problem]:
    """Every split builds with the same ``info``, and its first ``samples`` items (0: all) meet the contract."""
    build, _ = _factory(name, config)
    problems: list[Problem] = []
    first = None
    for split in SPLIT_NAMES:
        try:
            ds = build(config, split)
        except Exception as exc:  # any failure of the plugin is a problem to report, not a crash
            problems.append(Problem(f"does not load: {type(exc).__name__}: {exc}".splitlines()[0], f"split {split}"))
            continue
        if first is None:
            first = ds.info.to_dict()
        elif ds.info.to_dict() != first:
            problems.append(Problem("info differs from the train split's (every split reports the same info)", split))
        n = len(ds) if samples == 0 else min(samples, len(ds))
        for i in range(n):
            try:
                found = _item_problems(ds[i], ds.info)
            except Exception as exc:  # reading a sample may fail in any way
                found = [f"cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]]
            problems += [Problem(m, f"{split}[{i}]") for m in found]
    return problems


def check_dataset(source: str | Path, config: Any = None, *, samples: int = 64) -> list[Problem]:
    """Every problem of a dataset: its own checks (a folder format's: layout, dataset.yaml, CSV,
    each file decoded; a plugin's ``check(config)``), then, when they find none, the generic
    ones: every split loads with the same info and its first ``samples`` items (0: all) meet the
    sample contract. ``source``: a dataset folder, or a dataset name with its ``config``."""
    path = Path(source).expanduser()
    if config is None and (isinstance(source, Path) or "/" in str(source)) and not path.is_dir():
        return [Problem(f"not a dataset folder (expected a directory with {SPEC_FILE} and images/)", str(path))]
    name, config = _resolve(source, config)
    problems = _own_check(name, config)
    return problems or _generic_problems(name, config, samples)


def _write_measured(out: Path, names: list[str], rows: list[tuple[str, list[float]]]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *names])
        w.writerows([sid, *(repr(float(v)) for v in values)] for sid, values in rows)
    return out


def _measure_folder(module: Any, root: Path, out: Path) -> Path:
    """Structure variables of a built-in folder format, measured on the native files."""
    spec, table, _, problems = module.scan(root, deep=False)
    if problems:
        raise DatasetError(
            f"dataset {root}: {problems[0]} ({len(problems)} problem(s); run `segcft data check {root}`)"
        )
    assert spec is not None and table is not None
    cols = [j for j, v in enumerate(spec.variables) if v.measure is not None]
    if not cols:
        raise DatasetError(f"dataset {root}: no variable in {SPEC_FILE} has a measure (nothing to measure)")
    values = module.measure(root, spec, table)
    rows = [(sid, [row[j] for j in cols]) for sid, row in zip(table.ids, values)]
    return _write_measured(out, [spec.variables[j].name for j in cols], rows)


def _measure_items(name: str, config: Any, out: Path) -> Path:
    """Structure variables of any dataset, measured on its loaded masks (label count times the
    voxel size of ``info.spacing``); ids are ``<split>_<index>`` as ``segcft data export`` names them."""
    build, _ = _factory(name, config)
    splits = {s: build(config, s) for s in SPLIT_NAMES}
    info = splits["train"].info
    structural = [v for v in info.variables if v.measure is not None]
    if not structural:
        raise DatasetError(f"dataset {name!r}: no structure variable (nothing to measure)")
    voxel = float(np.prod(info.spacing))
    region_id = {n: k for k, n in info.regions.items()}
    rows = []
    for split, ds in splits.items():
        for i in range(len(ds)):
            item = ds[i]
            values = []
            for v in structural:
                assert v.measure is not None
                sel = item["mask"] == info.class_names.index(v.measure.structure)
                if v.measure.region is not None:
                    sel &= item["regions"] == region_id[v.measure.region]
                values.append(float(sel.sum()) * voxel)
            rows.append((f"{split}_{i:05d}", values))
    return _write_measured(out, [v.name for v in structural], rows)


def measure_dataset(source: str | Path, out: str | Path, config: Any = None) -> Path:
    """Write a new CSV (id plus every structure variable) measured from the masks of a dataset
    (a folder, or a name with its ``config``) to ``out``, which must lie outside the dataset
    folder. Folder formats measure on the native voxels, other datasets on their loaded items."""
    name, config = _resolve(source, config)
    out = Path(out).expanduser().resolve()
    root = Path(config.path).expanduser().resolve() if getattr(config, "path", "") else None
    if root is not None and (out == root or root in out.parents):
        raise UserError(f"--out {out} lies inside the dataset folder {root}; choose a path outside it")
    if name in _FOLDER_MODULES and root is not None:
        return _measure_folder(_FOLDER_MODULES[name], root, out)
    return _measure_items(name, config, out)


def exported_counts(path: str | Path) -> dict[str, int]:
    """Samples per split of an exported folder (its attributes.csv ``split`` column)."""
    with (Path(path) / CSV_FILE).open(newline="") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    return {s: splits.count(s) for s in SPLIT_NAMES}


def export_dataset(name: str, config: Any, out: str | Path, n: int, fmt: str = "tiff") -> Path:
    """Write exactly ``n`` samples of dataset ``name`` (80/10/10 over train/val/test) to the new
    folder ``out`` as ``fmt`` (tiff or nifti; segcft/data/export.py), loadable with that dataset."""
    build, config = _factory(name, config)
    return write_folder(name, build, config, out, n, fmt)


def _physical(ds: Any, limit: int) -> np.ndarray:
    """Physical parents of (up to ``limit``) samples of a split."""
    if hasattr(ds, "subjects"):
        return ds.subjects(np.arange(min(len(ds), limit)))[1].double().numpy()
    if hasattr(ds, "physical_parents"):
        return ds.physical_parents()[:limit]
    return np.stack([ds.info.denormalise(ds[i]["parents"].double()).numpy() for i in range(min(len(ds), limit))])


def show_dataset(
    name_or_path: str | Path, out_png: str | Path, samples: int = 8, config: Any = None, label: str | None = None
) -> str:
    """Summarise a dataset (split counts, variable ranges on train, class frequencies on up to
    64 training samples) and write a PNG montage of images with mask overlays (middle slice in
    3D). Returns the summary text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png).expanduser().resolve()
    name, config = _resolve(name_or_path, config)
    src = Path(config.path).expanduser().resolve() if getattr(config, "path", "") else None
    if src is not None and (src == out_png or src in out_png.parents):
        raise UserError(
            f"the montage {out_png} would be written inside the dataset folder {src}; choose a path outside it"
        )
    build, _ = _factory(name, config)
    label, splits = label or str(name_or_path), {s: build(config, s) for s in SPLIT_NAMES}
    train = splits["train"]
    info = train.info
    lines = [
        f"dataset {label} ({info.name}): {info.spatial_dims}D, shape {list(info.shape)}, "
        f"spacing {[round(s, 4) for s in info.spacing]} mm"
    ]
    lines.append("samples: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    pa = _physical(train, 100000)
    lines.append("variables (train):")
    for j, v in enumerate(info.variables):
        col = pa[:, j]
        if v.type == "binary":
            lines.append(f"  {v.name:<20} binary       mean {col.mean():.3f}")
        else:
            lines.append(
                f"  {v.name:<20} {v.unit or '-':<12} min {col.min():.4g}  mean {col.mean():.4g}  max {col.max():.4g}"
            )
    k = min(len(train), 64)
    counts = np.zeros(len(info.class_names), dtype=np.int64)
    items = [train[i] for i in range(k)]
    for it in items:
        counts += np.bincount(it["mask"].numpy().ravel(), minlength=len(counts))[: len(counts)]
    total = max(int(counts.sum()), 1)
    lines.append(
        f"class frequencies ({k} train samples): "
        + ", ".join(f"{n} {100 * c / total:.2f}%" for n, c in zip(info.class_names, counts))
    )

    m = min(samples, k)
    cols = min(m, 4)
    rows = max(1, math.ceil(m / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for a in axes.flat:
        a.axis("off")
    # Pixels with their true aspect: the middle (H, W) slice of a volume, rows over columns in mm.
    aspect = info.spacing[-2] / info.spacing[-1]
    for a, it in zip(axes.flat, items[:m]):
        img, mask = it["image"][0].numpy(), it["mask"].numpy()
        if info.spatial_dims == 3:
            img, mask = img[img.shape[0] // 2], mask[mask.shape[0] // 2]
        a.imshow(img, cmap="gray", vmin=-1, vmax=1, aspect=aspect)
        a.imshow(
            np.ma.masked_equal(mask, 0), cmap="tab10", vmin=0, vmax=9, alpha=0.4, interpolation="nearest", aspect=aspect
        )
        a.set_title(f"#{int(it['index'])}", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    lines.append(f"montage: {out_png}")
    return "\n".join(lines)
