"""The one writer of an evaluation's outputs: the summary (``metrics.json``), ``report.md``, the
headline shared by both, and the console lines ``segcft train`` ends with, all from the same
score records (:mod:`segcft.evaluation.records`) and the same formatting."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcft.checkpoint import atomic_write_text, write_json
from segcft.data.variables import DatasetInfo
from segcft.evaluation.checks import floor_footnotes, mark, sections
from segcft.evaluation.measure import measure_words
from segcft.evaluation.records import (
    AreaError,
    Bootstrap,
    Change,
    Composition,
    ExactError,
    Floor,
    Leakage,
    Reversibility,
    Scores,
    finite,
    fmt,
    get,
)
from segcft.run import RunDir

__all__ = [
    "REFERENCES",
    "Context",
    "console_headline",
    "print_headline",
    "summarise",
    "write_outputs",
    "write_report",
]

REFERENCES: dict[str, str] = {
    "unchanged": "the factual image, unchanged (a generator that ignores the parent)",
    "exact": "the exact counterfactual (phantoms; the best these segmentors can grade)",
}
"""Reference images scored beside the modes for every structure intervention."""

_HEADLINE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("MAPE", ("effectiveness", "eval", "mape"), "%"),
    ("leakage MAPE", ("leakage", "mape_mean", "eval"), "%"),
    ("change outside structure", ("locality", "outside"), ""),
    ("error vs exact cf", ("ground_truth", "all"), ""),
)
"""Headline measures (label, place in a mode's summary, unit), averaged over structure interventions."""


@dataclass(frozen=True)
class Context:
    """What a summary records beside the scores: the run and the evaluation's settings."""

    run: Any
    split: str
    count: int
    resamples: int
    seed: int
    dilation: int
    phantom: bool
    particles: int
    cycles: tuple[int, ...]


# -- summary (metrics.json) ---------------------------------------------------------------------


def summarise(scores: Scores, ctx: Context) -> dict[str, Any]:
    """Bootstrap every per-sample measure into mean and 95% interval (same resamples for all)."""
    run, info = ctx.run, ctx.run.info
    boot = Bootstrap(scores, ctx.resamples, ctx.seed)
    modes = list(run.generators)
    structures = [v.name for v in info.structure_variables]
    eval_seg = run.eval_segmentor if run.eval_segmentor is not None else run.segmentor
    whos = [w for w, s in (("eval", eval_seg), ("guide", run.segmentor)) if s is not None]
    out: dict[str, Any] = {
        "dataset": info.name,
        "split": ctx.split,
        "n": ctx.count,
        "modes": modes,
        "seed": ctx.seed,
        "bootstrap": ctx.resamples,
        "dilation": ctx.dilation,
        "particles": ctx.particles,
        "phantom": ctx.phantom,
        "eval_segmentor": "separate" if run.eval_segmentor is not None else "guide (no separate evaluation segmentor)",
        "guide_members": len(getattr(run.segmentor, "members", [run.segmentor])) if run.segmentor is not None else 0,
        "units": {v.name: v.unit for v in info.variables},
        "structures": structures,
        "regions": {v.name: v.measure.region for v in info.structure_variables if v.measure.region},
        "image_scale": "0-255",
    }
    out["factual"] = {s: {w: boot.errors(Floor(s, w, "")) for w in whos} for s in structures}
    out["composition"] = {m: {f"m{c}": boot.mean(Composition(m, c)) for c in ctx.cycles} for m in modes}
    inter: dict[str, Any] = {}
    for var in info.variables:
        inter[var.name] = {
            "references": _references(boot, scores, var.name, whos, structures),
            "type": var.type,
            "unit": var.unit,
            "structure": var.is_structure,
            "region": var.measure.region if var.measure else None,
            "descendants": sorted(info.descendants(var.name)),
            "modes": {m: _mode_entry(boot, var, m, whos, structures, ctx.phantom) for m in modes},
        }
    out["interventions"] = inter
    out["headline"] = headline(out)
    return out


def _mode_entry(
    boot: Bootstrap, var: Any, mode: str, whos: list[str], structures: list[str], phantom: bool
) -> dict[str, Any]:
    """One mode's summary for do(var): effectiveness, locality, leakage, ground truth, reversibility."""
    name = var.name
    entry: dict[str, Any] = {}
    if var.is_structure:
        entry["effectiveness"] = {w: boot.errors(AreaError(name, mode, w, name, "")) for w in whos}
        outside, inside = Change(name, mode, "outside"), Change(name, mode, "inside")
        entry["locality"] = {
            "outside": boot.mean(outside),
            "inside": boot.mean(inside),
            "ratio": boot.ratio(outside, inside),
        }
        region = Change(name, mode, "outside_region")
        if boot.scores.get(region) is not None:
            entry["locality"]["outside_region"] = boot.mean(region)
    others = [s for s in structures if s != name]
    entry["leakage"] = {
        "mape_mean": {w: boot.mean(Leakage(name, mode, w)) for w in whos} if others else None,
        "per_variable": {s: {w: boot.errors(AreaError(name, mode, w, s, "")) for w in whos} for s in others},
    }
    if phantom:
        entry["ground_truth"] = {
            "all": boot.mean(ExactError(name, mode, "all")),
            "outside": boot.mean(ExactError(name, mode, "outside")),
        }
    entry["reversibility"] = boot.mean(Reversibility(name, mode))
    return entry


def _references(boot: Bootstrap, scores: Scores, name: str, whos: list[str], structures: list[str]) -> dict[str, Any]:
    """Effectiveness and leakage of the reference images scored for do(name); per variable too, so
    that a descendant's error in a mode reads against the unchanged image (not following) and the
    exact counterfactual (the floor)."""
    others = [s for s in structures if s != name]
    return {
        ref: {
            "effectiveness": {w: boot.errors(AreaError(name, f"ref:{ref}", w, name, "")) for w in whos},
            "leakage": {
                "mape_mean": {w: boot.mean(Leakage(name, f"ref:{ref}", w)) for w in whos},
                "per_variable": {
                    s: {w: boot.errors(AreaError(name, f"ref:{ref}", w, s, "")) for w in whos} for s in others
                },
            },
        }
        for ref in REFERENCES
        if whos and scores.get(AreaError(name, f"ref:{ref}", whos[0], name, "ape")) is not None
    }


def headline(result: Mapping[str, Any]) -> list[str]:
    """One line per mode: the headline measures averaged over the structure interventions."""
    lines = []
    structural = [name for name, e in result["interventions"].items() if e["structure"]]
    for m in result["modes"]:
        parts = []
        for k, (label, path, unit) in enumerate(_HEADLINE):
            means = [(get(result["interventions"][n]["modes"][m], *path) or {}).get("mean") for n in structural]
            vals = [v for v in means if finite(v)]
            if vals:
                dagger = mark(result, "eval", *structural) if k < 2 else ""
                parts.append(f"{label} {float(np.mean(vals)):.2f}{unit}{dagger}")
        comp = get(result, "composition", m, "m1", "mean")
        if finite(comp):
            parts.append(f"composition {comp:.2f}")
        lines.append(f"{m}: " + (", ".join(parts) if parts else "no structure interventions"))
    return lines


def console_headline(result: Mapping[str, Any]) -> list[str]:
    """Per intervened structure variable and mode: effectiveness MAPE (evaluation segmentor),
    leakage MAPE of the other structures and mean change outside the structure (0-255); reads a
    summary in memory or one read back from metrics.json."""
    lines: list[str] = []
    for name, entry in (result.get("interventions") or {}).items():
        if not entry.get("structure"):
            continue
        parts = []
        own, others = mark(result, "eval", name), mark(result, "eval", *_others(result, name))
        for mode in result.get("modes", []):
            e = entry["modes"].get(mode, {})
            mape, leak, outside = (_mean(e, *path) for _, path, _ in _HEADLINE[:3])
            parts.append(f"{mode}: MAPE {mape}%{own}, leakage {leak}%{others}, outside {outside}")
        lines.append(f"do({name}) | " + " | ".join(parts))
    return lines


def _others(result: Mapping[str, Any], name: str) -> list[str]:
    """The structure variables other than ``name`` (whose errors make up its leakage)."""
    return [s for s in result.get("structures") or () if s != name]


def _mean(d: Any, *path: str) -> str:
    v = get(d, *path)
    v = v.get("mean") if isinstance(v, Mapping) else v
    return f"{v:.2f}" if finite(v) else "-"


def print_headline(run_dir: Path | str, result: Mapping[str, Any]) -> None:
    """The last lines of a run: the numbers that matter and where the report is."""
    for line in [*console_headline(result), *floor_footnotes(result)]:
        print(line, flush=True)
    for line in result.get("warnings") or []:
        print(f"warning: {line}", flush=True)
    print(f"report: {RunDir(run_dir).report}", flush=True)


# -- files --------------------------------------------------------------------------------------


def write_outputs(
    out_dir: Path | str,
    result: dict[str, Any],
    fig_store: Mapping[str, Mapping[str, Any]],
    split: str,
    info: DatasetInfo | None = None,
) -> dict[str, Any]:
    """Write figures/ (from ``fig_store``), metrics.json and report.md into ``out_dir``;
    returns ``result`` (with the figure names when there are figures). ``info`` gives the
    figures' pixel aspect and the report's areas/volumes wording."""
    rd = RunDir(out_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    if fig_store:
        from segcft.figures import counterfactual_grid

        paths = []
        for name, st in fig_store.items():
            paths.append(
                counterfactual_grid(
                    st["x"], st["cf"], st["seg"], rd.figures / f"cf_{_slug(name)}.png",
                    title=f"do({name}), {split} sample 0", factual_mask=st["mask"], focus=st["mask"],
                    spacing=None if info is None else info.spacing,
                ).name
            )  # fmt: skip
        result["figures"] = sorted(paths)
    write_json(rd.metrics_json, _json_safe(result))
    atomic_write_text(rd.report, write_report(result, None if info is None else info.spatial_dims))
    return result


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None so that metrics.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# -- report.md ----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _spatial_dims(result: Mapping[str, Any]) -> int:
    """3 when a structure variable of ``result`` is measured in mm^3 (metrics.json does not
    store the dataset's dimensionality), else 2."""
    units = result.get("units") or {}
    return 3 if any(units.get(s) == "mm^3" for s in result.get("structures") or ()) else 2


def write_report(result: Mapping[str, Any], spatial_dims: int | None = None) -> str:
    """Markdown report of ``evaluate``'s result: headline summary, then one table per
    intervened variable (rows are modes), grouped per region for regional variables.
    ``spatial_dims`` (None: from the structure variables' units) names areas or volumes."""
    modes, inter = result["modes"], result["interventions"]
    word, unit = measure_words(spatial_dims if spatial_dims is not None else _spatial_dims(result))
    L: list[str] = [f"# Evaluation: {result['dataset']} ({result['split']} split, {result['n']} subjects)", ""]
    L.append(
        f"Modes: {', '.join(modes)}. Means with 95% bootstrap intervals over subjects ({result['bootstrap']} "
        f"resamples, seed {result['seed']}). Effectiveness and leakage are measured by the evaluation segmentor "
        f"({result['eval_segmentor']}) as soft {word} in physical units ({unit}); image differences are on the 0-255 "
        f"scale; locality masks are dilated by {result['dilation']} voxels."
        + (
            f" The guide is an ensemble of {result['guide_members']} segmentors (their mean probabilities)."
            if int(result.get("guide_members") or 1) > 1
            else ""
        )
    )
    L.append("")
    L += _headline_section(result)
    L += _composition_section(result)
    L += _floor_section(result)
    L += sections(result)
    groups: dict[str | None, list[str]] = {}
    for name, entry in inter.items():
        groups.setdefault(entry["region"], []).append(name)
    for region, names in groups.items():
        if region is not None:
            L.append(f"## Region: {region}")
            L.append("")
        for name in names:
            L += _variable_section(name, result, level="###" if region else "##")
    notes = floor_footnotes(result)
    if notes:
        L += ["## Marks", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(L).rstrip() + "\n"


def _headline_section(result: Mapping[str, Any]) -> list[str]:
    """The headline lines, then one row per structure intervention and mode."""
    L = ["## Headline", "", "Means over the structure interventions (image differences on the 0-255 scale):", ""]
    L += [f"- {line}" for line in result.get("headline", [])]
    L.append("")
    rows = []
    for name, entry in result["interventions"].items():
        if not entry["structure"]:
            continue
        daggers = [mark(result, "eval", name), mark(result, "eval", *_others(result, name)), ""]
        for m in result["modes"]:
            e = entry["modes"][m]
            rows.append(
                [name, m]
                + [_marked(fmt(get(e, *path)), d) for (_, path, _), d in zip(_HEADLINE[:3], daggers)]
                + [
                    fmt(get(e, "locality", "outside_region")) if entry["region"] else "–",
                    fmt(get(e, *_HEADLINE[3][1])) if result["phantom"] else "–",
                ]
            )
    if rows:
        header = ["do(variable)", "mode", "MAPE % (eval)", "leakage MAPE %", "change outside structure"]
        L += _table([*header, "change outside region", "error vs exact cf"], rows)
    else:
        L.append("The dataset has no structure variables.")
    L.append("")
    return L


def _composition_section(result: Mapping[str, Any]) -> list[str]:
    """Composition after 1 and 10 null interventions (m = 10 on the first evaluate.composition_n
    subjects), reversibility averaged over interventions."""
    counts = {get(result, "composition", m, "m10", "n") for m in result["modes"]} - {None}
    if not counts:
        subset = "; m=10 not measured, evaluate.composition_n = 0"
    else:
        subset = f"; m=10 on the first {min(counts)} subjects" if min(counts) < result["n"] else ""
    L = [f"Composition and reversibility (mean |difference|, 0-255{subset}):", ""]
    rows = []
    for m in result["modes"]:
        revs = [
            (get(entry["modes"][m], "reversibility") or {}).get("mean") for entry in result["interventions"].values()
        ]
        rev = [r for r in revs if finite(r)]
        comp = [fmt(get(result, "composition", m, "m1")), fmt(get(result, "composition", m, "m10"))]
        rows.append([m, *comp, f"{float(np.mean(rev)):.2f}" if rev else "–"])
    L += _table(["mode", "composition m=1", "composition m=10", "reversibility (mean over interventions)"], rows)
    L.append("")
    return L


def _floor_section(result: Mapping[str, Any]) -> list[str]:
    """Measurement floor: both segmentors on the factual images."""
    L = ["## Measurement floor", "", "Segmentors on the factual images against the recorded values.", ""]
    rows = []
    for s, d in result["factual"].items():
        cells = [
            _marked(fmt(get(d, who, stat)), mark(result, who, s))
            for who in ("eval", "guide")
            for stat in ("mae", "mape")
        ]
        rows.append([s, result["units"].get(s, ""), *cells])
    if rows:
        L += _table(["variable", "unit", "MAE (eval)", "MAPE % (eval)", "MAE (guide)", "MAPE % (guide)"], rows)
        L.append("")
    return L


def _variable_section(name: str, result: Mapping[str, Any], level: str) -> list[str]:
    """The tables of do(name): one row per mode and reference, then per-variable leakage."""
    entry, modes, phantom = result["interventions"][name], result["modes"], result["phantom"]
    unit = entry["unit"]
    L = [f"{level} do({name})" + (f" [{unit}]" if unit else ""), ""]
    if entry["descendants"]:
        L.append(f"Descendants (follow through the mechanisms): {', '.join(entry['descendants'])}.")
        L.append("")
    header = ["mode"]
    if entry["structure"]:
        header += [
            f"MAE {unit} (eval)",
            "MAPE % (eval)",
            f"MAE {unit} (guide)",
            "MAPE % (guide)",
            "leakage MAPE % (eval)",
            "outside",
            "inside",
            "outside/inside",
        ]
        if entry["region"]:
            header.append("outside region")
    else:
        header += ["structures' MAPE % (eval)", "structures' MAPE % (guide)"]
    if phantom:
        header += ["error vs exact cf", "… outside structure"] if entry["structure"] else ["error vs exact cf"]
    header.append("reversibility")
    rows = []
    for m in modes:
        e = entry["modes"][m]
        r = [m]
        if entry["structure"]:
            r += _area_cells(e, result, name)
            r += [
                fmt(get(e, "locality", "outside")),
                fmt(get(e, "locality", "inside")),
                fmt(get(e, "locality", "ratio"), 3),
            ]
            if entry["region"]:
                r.append(fmt(get(e, "locality", "outside_region")))
        else:
            r += [fmt(get(e, "leakage", "mape_mean", "eval")), fmt(get(e, "leakage", "mape_mean", "guide"))]
        if phantom:
            r.append(fmt(get(e, "ground_truth", "all")))
            if entry["structure"]:
                r.append(fmt(get(e, "ground_truth", "outside")))
        r.append(fmt(get(e, "reversibility")))
        rows.append(r)
    refs = entry.get("references") or {}
    for ref, e in refs.items():
        r = [f"({ref})"]
        if entry["structure"]:
            r += _area_cells(e, result, name)
        rows.append(r + ["–"] * (len(header) - len(r)))
    L += _table(header, rows)
    L.append("")
    if refs:
        L.append("Reference rows: " + "; ".join(f"({ref}) {REFERENCES[ref]}" for ref in refs) + ".")
        L.append("")
    others = list((get(entry["modes"][modes[0]], "leakage", "per_variable") or {}).keys())
    if others:
        label = "Leakage" if entry["structure"] else "Structures"
        L.append(f"{label}: MAPE % (eval) of each other structure variable against its counterfactual value.")
        L.append("")
        sources = [(m, entry["modes"][m]) for m in modes] + [(f"({ref})", e) for ref, e in refs.items()]
        rows = [
            [row]
            + [
                _marked(fmt(get(e, "leakage", "per_variable", s, "eval", "mape")), mark(result, "eval", s))
                for s in others
            ]
            for row, e in sources
        ]
        L += _table(["mode", *others], rows)
        L.append("")
    return L


def _area_cells(e: Mapping[str, Any], result: Mapping[str, Any], name: str) -> list[str]:
    """Effectiveness (MAE, MAPE by both segmentors) and leakage cells of a mode or reference row
    for do(name), marked where the measuring segmentor's floor is over the threshold."""
    ev, guide = mark(result, "eval", name), mark(result, "guide", name)
    return [
        _marked(fmt(get(e, "effectiveness", "eval", "mae"), 1), ev),
        _marked(fmt(get(e, "effectiveness", "eval", "mape")), ev),
        _marked(fmt(get(e, "effectiveness", "guide", "mae"), 1), guide),
        _marked(fmt(get(e, "effectiveness", "guide", "mape")), guide),
        _marked(fmt(get(e, "leakage", "mape_mean", "eval")), mark(result, "eval", *_others(result, name))),
    ]


def _marked(text: str, dagger: str) -> str:
    """``text`` with the floor mark, when it shows a number."""
    return text + dagger if text != "–" else text
