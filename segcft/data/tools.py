"""Dataset tools behind `segcft data check|measure|export|show`.

None of them writes into a dataset folder: check and show only read, measure and export write
to a new location given by the user.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segcft.data import nifti, tiff
from segcft.data.folder import CSV_FILE, SPEC_FILE, Problem, class_labels
from segcft.errors import DatasetError, UserError

__all__ = ["Problem", "check_dataset", "export_dataset", "measure_dataset", "show_dataset"]

_BUILTIN: dict[str, tuple[str, str]] = {
    "cxr-phantom": ("segcft.data.cxr_phantom", "CXRPhantomConfig"),
    "ccta-phantom": ("segcft.data.ccta_phantom", "CCTAPhantomConfig"),
    "tiff": ("segcft.data.tiff", "TiffConfig"),
    "nifti": ("segcft.data.nifti", "NiftiConfig"),
}


def _format(root: Path) -> Any:
    """The format module of a dataset folder: ``nifti`` when its images are .nii/.nii.gz, else ``tiff``."""
    return nifti if nifti.is_nifti_folder(root) else tiff


def check_dataset(path: str | Path) -> list[Problem]:
    """Every problem of a TIFF or NIfTI dataset folder (layout, dataset.yaml, CSV, each file
    decoded), each naming its file, CSV row or YAML key; an empty list means the folder is usable."""
    root = Path(path).expanduser().resolve()
    _, _, _, problems = _format(root).scan(root, deep=True)
    return problems


def measure_dataset(path: str | Path, out: str | Path) -> Path:
    """Write a new CSV (id plus every structure variable) measured from the masks of the TIFF
    or NIfTI dataset at ``path`` to ``out``, which must lie outside the dataset folder."""
    root = Path(path).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    if out == root or root in out.parents:
        raise UserError(f"--out {out} lies inside the dataset folder {root}; choose a path outside it")
    fmt = _format(root)
    spec, table, _, problems = fmt.scan(root, deep=False)
    if problems:
        raise DatasetError(
            f"dataset {root}: {problems[0]} ({len(problems)} problem(s); run `segcft data check {root}`)"
        )
    assert spec is not None and table is not None
    cols = [j for j, v in enumerate(spec.variables) if v.measure is not None]
    if not cols:
        raise DatasetError(f"dataset {root}: no variable in {SPEC_FILE} has a measure (nothing to measure)")
    values = fmt.measure(root, spec, table)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [spec.variables[j].name for j in cols])
        for sid, row in zip(table.ids, values):
            w.writerow([sid] + [repr(float(row[j])) for j in cols])
    return out


def _factory(name: str, config: Any) -> tuple[Callable[[Any, str], Any], Any]:
    """The dataset's build function and its config (default config when ``config`` is None)."""
    try:
        from segcft.plugins import get_registry
    except ImportError:
        pass
    else:
        entry = get_registry().get("dataset", name)
        return entry.load(), config if config is not None else entry.config()
    if name not in _BUILTIN:
        raise UserError(f"unknown dataset {name!r}; known: {sorted(_BUILTIN)}")
    import importlib

    module_name, config_name = _BUILTIN[name]
    module = importlib.import_module(module_name)
    if config is None:
        from segcft.data import configs

        config = getattr(configs, config_name)()
    return module.build, config


def _split_counts(name: str, n: int, lengths: dict[str, int]) -> dict[str, int]:
    """Samples to export per split: 80/10/10, a split too short for its share passing the rest
    to the others (train first); UserError when the splits hold fewer than ``n`` in all."""
    if sum(lengths.values()) < n:
        raise UserError(
            f"--n {n}: dataset {name!r} has only {sum(lengths.values())} samples "
            f"({', '.join(f'{s} {k}' for s, k in lengths.items())})"
        )
    val = round(0.1 * n) if n >= 3 else 0
    test = round(0.1 * n) if n >= 3 else 0
    want = {"train": n - val - test, "val": val, "test": test}
    counts = {s: min(want[s], lengths[s]) for s in want}
    for s in counts:
        counts[s] += min(n - sum(counts.values()), lengths[s] - counts[s])
    return counts


def export_dataset(name: str, config: Any, out: str | Path, n: int) -> Path:
    """Write ``n`` samples of dataset ``name`` (80/10/10 over train/val/test, the first indices
    of each split) to the new folder ``out`` in the TIFF layout, so it loads with ``tiff``."""
    import tifffile
    import yaml

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new path")
    build, config = _factory(name, config)
    datasets = {s: build(config, s) for s in ("train", "val", "test")}
    info = datasets["train"].info
    counts = _split_counts(name, n, {s: len(d) for s, d in datasets.items()})
    if counts["train"] < 1:
        raise UserError(f"dataset {name!r} has no training samples to export")
    for folder in ("images", "masks") + (("regions",) if info.regions else ()):
        (out / folder).mkdir(parents=True, exist_ok=True)
    max_label = max(list(info.structures) + list(info.regions) + [0])
    labels = class_labels(info.structures)
    label_dtype = np.uint8 if max_label < 256 else np.uint16
    rows = []
    for split, ds in datasets.items():
        for i in range(counts[split]):
            item = ds[i]
            sid = f"{split}_{i:05d}"
            tifffile.imwrite(out / "images" / f"{sid}.tif", item["image"][0].numpy().astype(np.float32))
            tifffile.imwrite(out / "masks" / f"{sid}.tif", labels[item["mask"].numpy()].astype(label_dtype))
            if info.regions:
                tifffile.imwrite(out / "regions" / f"{sid}.tif", item["regions"].numpy().astype(label_dtype))
            values = info.denormalise(item["parents"].double()).tolist()
            rows.append(
                [sid, split]
                + [str(round(v)) if var.type == "binary" else repr(float(v)) for var, v in zip(info.variables, values)]
            )
    spec = {
        "name": info.name,
        "spatial_dims": info.spatial_dims,
        "spacing": [float(s) for s in info.spacing],
        "intensity": {"min": -1.0, "max": 1.0},
        "structures": {int(k): v for k, v in info.structures.items()},
        "variables": {
            v.name: {
                "type": v.type,
                "parents": list(v.parents),
                "unit": v.unit,
                **(
                    {
                        "measure": {
                            "structure": v.measure.structure,
                            **({"region": v.measure.region} if v.measure.region else {}),
                        }
                    }
                    if v.measure
                    else {}
                ),
            }
            for v in info.variables
        },
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 0},
    }
    if info.regions:
        spec["regions"] = {int(k): v for k, v in info.regions.items()}
    (out / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    with (out / CSV_FILE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", *info.variable_names])
        w.writerows(rows)
    return out


def _open(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        from segcft.data.configs import NiftiConfig, TiffConfig

        if nifti.is_nifti_folder(p):
            return str(p), {s: nifti.build(NiftiConfig(path=str(p)), s) for s in ("train", "val", "test")}
        return str(p), {s: tiff.build(TiffConfig(path=str(p)), s) for s in ("train", "val", "test")}
    build_split, config = _factory(str(name_or_path), None)
    return str(name_or_path), {s: build_split(config, s) for s in ("train", "val", "test")}


def _physical(ds: Any, limit: int) -> np.ndarray:
    """Physical parents of (up to ``limit``) samples of a split."""
    if hasattr(ds, "subjects"):
        return ds.subjects(np.arange(min(len(ds), limit)))[1].double().numpy()
    if hasattr(ds, "physical_parents"):
        return ds.physical_parents()[:limit]
    return np.stack([ds.info.denormalise(ds[i]["parents"].double()).numpy() for i in range(min(len(ds), limit))])


def show_dataset(name_or_path: str | Path, out_png: str | Path, samples: int = 8) -> str:
    """Summarise a dataset (split counts, variable ranges on train, class frequencies on up to
    64 training samples) and write a PNG montage of images with mask overlays (middle slice in
    3D). Returns the summary text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png).expanduser().resolve()
    src = Path(name_or_path).expanduser().resolve()
    if src.is_dir() and (src == out_png or src in out_png.parents):
        raise UserError(
            f"the montage {out_png} would be written inside the dataset folder {src}; choose a path outside it"
        )
    label, splits = _open(name_or_path)
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
