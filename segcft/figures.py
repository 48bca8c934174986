"""PNG figures of a run: counterfactual grids, difference maps, segmentation overlays and
training curves (matplotlib, Agg backend: no display needed).

3D volumes (D, H, W) are shown as one (D, W) section at the H index with most voxels of the
structure of interest (the middle one without a mask): a longitudinal view of a vessel that
runs along D, a coronal one of an axial stack. Given the spacing, pixels are drawn with their
true aspect (height over width in mm), so anisotropic voxels are not stretched.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "counterfactual_grid",
    "counterfactual_png",
    "display_aspect",
    "display_slice",
    "focus_section",
    "plot_training_curves",
]


_BARE: dict[str, list[float]] = {"xticks": [], "yticks": []}
"""Image panels carry no ticks: skipping them makes layout and drawing several times cheaper."""


def _figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure outside pyplot (no global state, no display; saved with Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def display_slice(volume: np.ndarray, focus: np.ndarray | None = None) -> int | None:
    """Index along axis 1 (H) of the section shown for a 3D ``volume`` (None for a 2D image):
    the one with most ``focus`` voxels, else the middle one."""
    if volume.ndim == 2:
        return None
    if volume.ndim != 3:
        raise ValueError(f"display_slice expects a 2D or 3D array, got shape {volume.shape}")
    if focus is not None and focus.any():
        return int(np.argmax(focus.sum(axis=(0, 2))))
    return volume.shape[1] // 2


def display_aspect(spacing: Sequence[float] | None) -> float | str:
    """imshow ``aspect`` of the displayed image for a dataset of ``spacing`` (mm per axis, slowest
    first): the row axis' spacing over the column axis' (D over W for the (D, W) section of a
    volume, H over W in 2D); ``"equal"`` (square pixels) when the spacing is not known."""
    if not spacing:
        return "equal"
    if len(spacing) not in (2, 3):
        raise ValueError(f"display_aspect expects 2 or 3 spacings, got {list(spacing)}")
    return float(spacing[0]) / float(spacing[-1])


def panel_size(image: np.ndarray, aspect: float | str, width: float) -> tuple[float, float]:
    """(width, height) in inches of a panel showing ``image`` with imshow ``aspect``: ``width``
    for a square image; a tall one (the (D, W) section of a volume) gets the same area, narrower
    and taller, with its height over width clipped to 4. Figures are sized to their panels, so
    a tall section does not float in white margins."""
    rows, cols = image.shape[-2:]
    scale = 1.0 if isinstance(aspect, str) else float(aspect)
    ratio = min(max(rows * scale / max(cols, 1), 0.25), 4.0)
    w = width / math.sqrt(max(ratio, 1.0))
    return w, w * ratio


def _section(a: np.ndarray, index: int | None) -> np.ndarray:
    a = np.asarray(a)
    while a.ndim > 3 or (a.ndim == 3 and index is None):
        a = a[0]
    return a if index is None else a[:, index, :]


def counterfactual_grid(
    factual: np.ndarray,
    counterfactuals: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    out_png: Path | str,
    title: str = "",
    factual_mask: np.ndarray | None = None,
    focus: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """One row per mode: factual, counterfactual, difference map (x_cf - x, symmetric colour
    scale shared by all rows, 0-255 units), and the counterfactual with the segmentation of it
    overlaid (outlines of the factual segmentation in white when given).

    Images are (*S) or (1, *S) in [-1, 1]; masks are label maps of the same spatial shape;
    ``spacing`` (mm per axis) draws pixels with their true aspect (see :func:`display_aspect`)."""
    factual = np.asarray(factual, dtype=np.float32)
    idx = display_slice(
        np.squeeze(factual, axis=0) if factual.ndim in (3, 4) and factual.shape[0] == 1 else factual, focus
    )
    x = _section(factual, idx)
    modes = list(counterfactuals)
    diffs = {m: (_section(counterfactuals[m], idx) - x) * 127.5 for m in modes}
    vmax = max([float(np.abs(d).max()) for d in diffs.values()] + [1.0])
    n = max(len(modes), 1)
    aspect = display_aspect(spacing)
    w, h = panel_size(x, aspect, 2.3)
    fig = _figure((4 * max(w, 1.3) + 0.6, n * (h + 0.35) + 0.4))
    axes = fig.subplots(n, 4, squeeze=False, subplot_kw=_BARE)
    fm = None if factual_mask is None else _section(factual_mask, idx)
    for r, mode in enumerate(modes):
        xc = _section(counterfactuals[mode], idx)
        seg = _section(masks[mode], idx) if mode in masks else None
        panels = [
            (x, "factual", dict(cmap="gray", vmin=-1, vmax=1)),
            (xc, f"{mode}: counterfactual", dict(cmap="gray", vmin=-1, vmax=1)),
            (diffs[mode], "difference (0-255)", dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
            (xc, "segmentation", dict(cmap="gray", vmin=-1, vmax=1)),
        ]
        for c, (img, label, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, interpolation="nearest", aspect=aspect, **kw)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
            if c == 2:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        if seg is not None:
            overlay = np.ma.masked_where(seg == 0, seg)
            axes[r, 3].imshow(overlay, cmap="tab10", alpha=0.45, interpolation="nearest", vmin=0, vmax=9, aspect=aspect)
        if fm is not None and fm.any():
            axes[r, 3].contour(fm > 0, levels=[0.5], colors="white", linewidths=0.6)
    return _save(fig, out_png, title, fontsize=10)


def focus_section(volume: np.ndarray, masks: Sequence[np.ndarray] = ()) -> int | None:
    """Index along axis 1 (H) of the section shown for a 3D ``volume`` (None in 2D): the one
    where the largest of ``masks`` (say, a structure in the factual and the counterfactual)
    covers most voxels; the middle one when they are all empty."""
    if volume.ndim == 2:
        return None
    areas = [np.asarray(m).reshape(volume.shape).sum(axis=(0, 2)) for m in masks if np.asarray(m).any()]
    if not areas:
        return display_slice(volume)
    return int(np.argmax(np.max(np.stack(areas), axis=0)))


def counterfactual_png(
    factual: np.ndarray,
    counterfactual: np.ndarray,
    out_png: Path | str,
    std: np.ndarray | None = None,
    title: str = "",
    focus: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    masks: Sequence[np.ndarray] = (),
    structure: str | None = None,
    scale: float = 127.5,
    unit: str = "0-255",
) -> Path:
    """Factual, counterfactual, their difference (diverging colours centred on 0, in ``unit``:
    [-1, 1] differences times ``scale``) and, with several particles, the per-pixel standard
    deviation of one what-if, from arrays in [-1, 1] of shape (*S). In 3D the (D, W) section
    through the ``structure`` (the H index where the largest of ``masks``, or else ``focus``,
    is largest); ``spacing`` (mm per axis) draws pixels with their true aspect."""
    volume = np.asarray(factual)
    idx = focus_section(volume, masks) if masks else display_slice(volume, focus)
    x, xc = _section(factual, idx), _section(counterfactual, idx)
    diff = (xc - x) * scale
    vmax = max(float(np.abs(diff).max()), 1e-6 * scale)
    panels = [
        (x, "factual", dict(cmap="gray", vmin=-1, vmax=1)),
        (xc, "counterfactual", dict(cmap="gray", vmin=-1, vmax=1)),
        (diff, f"counterfactual - factual ({unit})", dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax)),
    ]
    if std is not None:
        panels.append((_section(std, idx) * scale, f"uncertainty (std, {unit})", dict(cmap="magma")))
    aspect = display_aspect(spacing)
    w, h = panel_size(x, aspect, 2.6)
    fig = _figure((len(panels) * (max(w, 1.4) + 0.6), h + 1.0))
    axes = fig.subplots(1, len(panels), squeeze=False)
    rows, cols = ("D", "W") if idx is not None else ("H", "W")
    for c, (img, label, kw) in enumerate(panels):
        ax = axes[0, c]
        im = ax.imshow(img, interpolation="nearest", aspect=aspect, **kw)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel(f"{cols} (voxel)", fontsize=7)
        ax.set_ylabel(f"{rows} (voxel)", fontsize=7)
        ax.tick_params(labelsize=6)
        if c >= 2:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    where = []
    if structure:
        where.append(structure)
    if idx is not None:
        where.append(f"section H = {idx} of {volume.shape[1]}")
    full = "\n".join(t for t in (title, ", ".join(where)) if t)
    return _save(fig, out_png, full, fontsize=9)


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_training_curves(
    csv_path: Path | str, out_dir: Path | str, x: str = "step", group: str = "stage"
) -> list[Path]:
    """One PNG per training stage (``curves_<stage>.png``, or ``curves.png`` without a stage
    column) with one panel per numeric column of the metrics CSV against ``x``.

    Rows may leave columns empty (different stages log different metrics); a column that is
    empty in a stage gets no panel there. Each PNG records a digest of its rows, and a stage
    whose rows have not changed since is not drawn again (the pipeline calls this after every
    stage). Returns the paths of every stage's PNG."""
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    columns = [c for c in rows[0] if c not in (x, group)]
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row.get(group, "") or "", []).append(row)
    written: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, grows in groups.items():
        xs = np.array([_float(r.get(x, "")) if x in r else i for i, r in enumerate(grows)], dtype=np.float64)
        series: dict[str, np.ndarray] = {}
        for col in columns:
            ys = np.array([_float(r.get(col, "")) for r in grows], dtype=np.float64)
            if np.isfinite(ys).any():
                series[col] = ys
        if not series:
            continue
        out = out_dir / (f"curves_{_slug(name)}.png" if name else "curves.png")
        written.append(out)
        digest = hashlib.sha256(
            repr((name, x, {c: v.tolist() for c, v in series.items()}, xs.tolist())).encode()
        ).hexdigest()
        if _png_text(out, _DIGEST_KEY) == digest:
            continue
        n = len(series)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig = _figure((4.0 * ncols, 2.8 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, (col, ys) in zip(axes.flat, series.items()):
            keep = np.isfinite(ys) & np.isfinite(xs)
            ax.plot(xs[keep], ys[keep], lw=1.0, marker="o" if keep.sum() <= 20 else None, ms=2.5)
            ax.set_title(col, fontsize=9)
            ax.set_xlabel(x, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        if name:
            fig.suptitle(f"stage: {name}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out, dpi=100, metadata={_DIGEST_KEY: digest})
    return written


_DIGEST_KEY = "segcft-data-digest"


def _png_text(path: Path, key: str) -> str | None:
    """A text entry of a PNG file (None when the file or the entry is missing or unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(key)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _save(fig: Any, out_png: Path | str, title: str | None, fontsize: int) -> Path:
    """Title, lay out and write a figure as PNG (parent folders created); returns the path."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
