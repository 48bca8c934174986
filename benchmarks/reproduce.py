"""Reproduce the Seg-CFT / Pos-Seg-CFT claims on the phantoms and update REPRODUCTION.md.

Runs the quick preset with several seeds on cxr-phantom (modes none, reg, seg) and on
ccta-phantom (none, reg, seg, pos-seg) through the library (``segcft.train.run_training``; a
run folder that is complete is reused, an unfinished one resumed), then reads every run's
metrics.json and writes the tables and, for each claim, whether it held. Only the generated blocks
of the datasets aggregated are rewritten (between markers); other datasets' blocks and the
hand-written sections of the file are kept:

cxr-phantom, for each lung and heart area intervention (evaluation segmentor, test split):
  Seg-CFT MAPE <= 1.25 x the exact counterfactual's; its change outside the structure <= 1.5 (0-255)
  and <= Reg-CFT's; its error against the exact counterfactual below no fine-tuning's (closer to
  the truth than the unchanged image); Reg-CFT MAPE <= 0.8 x no fine-tuning's (a working
  baseline); and whether Seg-CFT's MAPE is below Reg-CFT's.
ccta-phantom, for each regional plaque intervention:
  the exact counterfactual's MAPE <= 10 % (the evaluation segmentor resolves plaque per region);
  Pos-Seg-CFT's MAPE <= 0.5 x no fine-tuning's; its change outside the intervened region <=
  Reg-CFT's; the lumen volume (the plaques' descendant) follows: Pos-Seg-CFT's lumen error below
  no fine-tuning's.

A claim is judged on the mean over seeds of each seed's test-split mean; the report also gives
the number of seeds in which it held on its own. The evaluation is the library's, unchanged.

    python benchmarks/reproduce.py [--seeds 0 1 2] [--runs runs/reproduce] [--device auto]
                                   [--datasets cxr-phantom ccta-phantom] [--jobs 2] [--report-only]

On a CPU machine, ``--jobs 2`` (on two cores) trains two runs side by side with one thread each, which
finishes the three seeds sooner than one run at a time on both cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

DATASETS: dict[str, dict[str, Any]] = {
    # Eight times the quick preset's 400 fine-tuning steps at twice its learning rate, with
    # Seg-CFT's locality weight at 400 over the band between the guide masks (the structure's
    # interior held to x as well as the outside): on the validation split of seed 0 every structure
    # is closer to the exact counterfactual than the unchanged image, the change outside is about
    # 1 / 255, and the MAPE is within 1.25 x exact for the left lung and the heart (right lung
    # 0.23 points over). Chosen on the validation split against 1600 steps at weight 200 without
    # the band, which met the MAPE bound everywhere but left the lungs further from the exact
    # counterfactual than the unchanged image (REPRODUCTION.md, "Holding the interior" onwards).
    # Reg-CFT gets the same steps and learning rate. About an hour per run on 2 cores.
    # The guide is an ensemble of three segmentors (train.segmentor.guides=3, about 4 minutes more):
    # on seed 0's validation split, from the same pre-trained stages, it lowered Seg-CFT's MAPE, its
    # change outside the structure and its error against the exact counterfactual for every
    # structure, and halved the gap between the guide's reading and the evaluation segmentor's
    # (REPRODUCTION.md, "2D: a guide ensemble at reproduce.py's budget"). The claims table of
    # 2026-12-05 is the first with the quick preset's parent maps (about 2 h a seed with three seeds
    # side by side on 2 cores) and, regenerated that day, with its soft labels for the regressor's
    # terms (every Seg-CFT claim held in 3/3 seeds; Reg-CFT's lungs on its 0.8 x none line;
    # REPRODUCTION.md, "The cxr-phantom claims with soft labels").
    "cxr-phantom": {
        "modes": ["none", "reg", "seg"],
        "overrides": [
            "train.segmentor.guides=3",
            "cft.steps=3200",
            "cft.lr=6e-4",
            "cft.objectives.seg.locality=400",
            "cft.objectives.seg.locality_band=true",
        ],
    },
    # 1200 x 4 fine-tuning steps (five times the quick preset's 240), with the locality penalty at 100
    # for the segmentor-guided modes. On seed 0's validation split, from the same pre-trained stages,
    # Pos-Seg-CFT's per-region plaque MAPE fell from 44 / 37 / 31 % at 600 steps to 33 / 31 / 20 %
    # (none 61 / 41 / 49) while its change outside the intervened region stayed at or below Reg-CFT's
    # (REPRODUCTION.md, "3D: 1200 fine-tuning steps"). Every mode gets the same steps. About 25-30 minutes
    # per mode on one core.
    # The regressor trains 2400 steps instead of the quick preset's 150: at 150 its plaque heads read
    # the other parents, not the image (slope 0.01-0.02 on exact counterfactuals), at 2400 they follow
    # the plaque (slope 0.79 / 0.72 / 0.66; REPRODUCTION.md, "3D: a regressor that sees the plaque").
    # Both segmentors at the unet's default widths 16-32-64-128 instead of the quick preset's 8-16-32-64:
    # the exact counterfactual's plaque MAPE 13-19 % -> 11-14 % per region on seeds 0 and 1 (val;
    # REPRODUCTION.md, "a wider segmentor"), and for 3600 steps instead of 1800: 9.0-12.4 % (REPRODUCTION.md,
    # "ccta-phantom guide: wide and 3600 steps"). The claims table of 2026-12-03 predates these changes.
    # The evaluation segmentor alone trains 7200 steps (`train.segmentor.eval_steps`; the guide keeps
    # 3600, so fine-tuning is unchanged): the exact counterfactual's plaque MAPE on val 9.4 / 9.8 / 10.1
    # and 7.6 / 9.0 / 8.6 % against 10.4 / 10.7 / 12.4 and 9.0 / 10.0 / 9.9 at 3600 (REPRODUCTION.md,
    # "ccta-phantom segmentors at 7200 steps"). About 12-18 more minutes per seed on one core.
    # The generator is the quick preset's: since 2026-12-06 with parent maps up to 16 x 8 x 8
    # (REPRODUCTION.md, "3D: parent maps again, and maps kept to the coarse stages"). With them and the
    # soft labels, seeds 0, 1 and 2 meet every Pos-Seg-CFT plaque claim in every region (0.34 / 0.34 /
    # 0.30 x none; REPRODUCTION.md, "3D: the claims at reproduce.py's setting with soft labels and
    # coarse parent maps"), about 111 minutes per seed on one core.
    "ccta-phantom": {
        "modes": ["none", "reg", "seg", "pos-seg"],
        "overrides": [
            "segmentor.channels=[16, 32, 64, 128]",
            "train.segmentor.steps=3600",
            "train.segmentor.eval_steps=7200",
            "train.regressor.steps=2400",
            "cft.steps=1200",
            "cft.warmup=20",
            "cft.objectives.seg.locality=100",
            "cft.objectives.pos-seg.locality=100",
        ],
    },
}
CXR_TARGETS = ("left_lung_area", "right_lung_area", "heart_area")
CCTA_TARGETS = ("plaque_proximal", "plaque_mid", "plaque_distal")


def run_dir_for(runs: Path, dataset: str, seed: int) -> Path:
    return runs / f"{dataset}-seed{seed}"


def train_all(datasets: list[str], seeds: list[int], runs: Path, device: str, extra: list[str]) -> dict[str, float]:
    """Train and evaluate every (dataset, seed) run; returns wall seconds per run folder."""
    from segcft.config import dump_run_config, load_run_config
    from segcft.train import run_training

    timings: dict[str, float] = {}
    for name in datasets:
        spec = DATASETS[name]
        for seed in seeds:
            overrides = [
                f"seed={seed}",
                f"device={device}",
                f"cft.modes=[{', '.join(spec['modes'])}]",
                *spec["overrides"],
                *extra,
            ]
            cfg = load_run_config(preset="quick", overrides=overrides, components={"dataset": name})
            run_dir = run_dir_for(runs, name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_run_config(cfg, run_dir / "requested-config.yaml")
            print(f"== {name} seed {seed} -> {run_dir}", flush=True)
            t0 = time.perf_counter()
            resume = "auto" if (run_dir / "config.yaml").is_file() else None
            run_training(cfg, run_dir, resume=resume)
            timings[str(run_dir)] = time.perf_counter() - t0
    return timings


def worker_command(name: str, seed: int, runs: Path, device: str, extra: list[str]) -> list[str]:
    """The command line of one ``--jobs`` worker: this script training one (dataset, seed) run."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train-only", "--datasets", name,
           "--seeds", str(seed), "--runs", str(runs), "--device", device]
    return cmd + [f"--set={o}" for o in extra]


def train_parallel(
    datasets: list[str], seeds: list[int], runs: Path, device: str, extra: list[str], jobs: int,
    worker: Callable[[str, int, Path, str, list[str]], list[str]] = worker_command,
) -> tuple[dict[str, float], list[str]]:
    """``train_all`` with each (dataset, seed) run in a process of its own, ``jobs`` at a time and the
    CPUs split between them (one thread each on two cores at ``--jobs 2``): runs of one thread side by
    side finish more work per hour than one run on every core. Each run's output goes to its folder's
    ``reproduce.log``. Returns wall seconds per run folder of the runs that finished, and the runs
    that failed."""
    import os
    import subprocess

    from segcft.train.context import available_cpus

    threads = str(max(1, available_cpus() // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending = [(name, seed) for name in datasets for seed in seeds]
    running: list[tuple[subprocess.Popen[bytes], Path, float]] = []
    timings: dict[str, float] = {}
    failed: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, seed = pending.pop(0)
                run_dir = run_dir_for(runs, name, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                cmd = worker(name, seed, runs, device, extra)
                with open(run_dir / "reproduce.log", "ab") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                print(f"== {name} seed {seed} -> {run_dir} ({threads} thread(s), log {run_dir / 'reproduce.log'})",
                      flush=True)
                running.append((proc, run_dir, time.perf_counter()))
            time.sleep(1.0)
            for item in list(running):
                proc, run_dir, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode == 0:
                    timings[str(run_dir)] = time.perf_counter() - t0
                    print(f"== {run_dir} finished in {timings[str(run_dir)] / 60:.1f} min", flush=True)
                else:
                    failed.append(f"{run_dir} (exit {proc.returncode}; see {run_dir / 'reproduce.log'})")
                    print(f"== {failed[-1]}", flush=True)
    finally:  # interrupted: no worker outlives this script
        for proc, _, _ in running:
            proc.terminate()
        for proc, _, _ in running:
            proc.wait(timeout=30)
    return timings, failed


# -- aggregation --------------------------------------------------------------------------------


def _mean(ci: dict[str, Any] | None) -> float:
    v = None if not isinstance(ci, dict) else ci.get("mean")
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else math.nan


def _path(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


METRICS: dict[str, tuple[str, ...]] = {
    "MAPE %": ("effectiveness", "eval", "mape"),
    "MAPE % (guide)": ("effectiveness", "guide", "mape"),
    "MAE": ("effectiveness", "eval", "mae"),
    "leakage MAPE %": ("leakage", "mape_mean", "eval"),
    "outside": ("locality", "outside"),
    "inside": ("locality", "inside"),
    "outside region": ("locality", "outside_region"),
    "exact-cf error": ("ground_truth", "all"),
    "exact-cf error outside": ("ground_truth", "outside"),
    "reversibility": ("reversibility",),
}


@dataclass
class Cell:
    """One metric of one (variable, mode) over seeds: per-seed bootstrap summaries."""

    per_seed: list[dict[str, Any] | None]

    @property
    def means(self) -> list[float]:
        return [_mean(c) for c in self.per_seed]

    @property
    def mean(self) -> float:
        vals = [v for v in self.means if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def text(self, digits: int = 2) -> str:
        vals = [v for v in self.means if math.isfinite(v)]
        if not vals:
            return "–"
        if len(vals) == 1:
            c = next(c for c in self.per_seed if math.isfinite(_mean(c)))
            return f"{vals[0]:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"
        return f"{self.mean:.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})"


def load_metrics(runs: Path, dataset: str, seeds: list[int]) -> list[dict[str, Any]]:
    out = []
    for seed in seeds:
        path = run_dir_for(runs, dataset, seed) / "metrics.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def cell(results: list[dict[str, Any]], var: str, mode: str, metric: str) -> Cell:
    return Cell([_path(r, "interventions", var, "modes", mode, *METRICS[metric]) for r in results])


REFERENCE_ROWS = ("unchanged", "exact")
"""`segcft evaluate`'s reference images: the factual image unchanged, and the exact counterfactual."""


def reference_cell(results: list[dict[str, Any]], var: str, ref: str, metric: str) -> Cell:
    """A reference image's figure (effectiveness and leakage only; other metrics are empty)."""
    return Cell([_path(r, "interventions", var, "references", ref, *METRICS[metric]) for r in results])


def descendant_cell(results: list[dict[str, Any]], var: str, mode: str, child: str) -> Cell:
    """MAPE % (evaluation segmentor) of structure ``child`` against its counterfactual value under do(var):
    how far a descendant followed the intervention through its mechanism."""
    path = ("leakage", "per_variable", child, "eval", "mape")
    return Cell([_path(r, "interventions", var, "modes", mode, *path) for r in results])


def constant_cell(value: float, seeds: int) -> Cell:
    """A fixed bound (a target in the metric's units) as a cell with the same value in every seed."""
    return Cell([{"mean": value, "lo": value, "hi": value}] * seeds)


@dataclass
class Claim:
    dataset: str
    text: str
    variable: str
    lhs: Cell
    rhs: list[tuple[str, Cell, float]]  # (label, baseline, factor): lhs <= factor * baseline (< when strict)
    strict: bool = False

    def _holds(self, a: float, b: float, factor: float) -> bool:
        if not (math.isfinite(a) and math.isfinite(b)):
            return False
        return a < factor * b if self.strict else a <= factor * b

    @property
    def held(self) -> bool | None:
        if not math.isfinite(self.lhs.mean) or any(not math.isfinite(c.mean) for _, c, _ in self.rhs):
            return None
        return all(self._holds(self.lhs.mean, c.mean, f) for _, c, f in self.rhs)

    def seeds_held(self) -> tuple[int, int]:
        n = len(self.lhs.per_seed)
        ok = 0
        for s in range(n):
            a = self.lhs.means[s]
            if all(self._holds(a, c.means[s] if s < len(c.means) else math.nan, f) for _, c, f in self.rhs):
                ok += 1
        return ok, n

    def numbers(self) -> str:
        parts = [f"{self.lhs.mean:.2f}"]
        for label, c, f in self.rhs:
            bound = f"{f:g} x {label} = {f * c.mean:.2f}" if f != 1.0 else f"{label} {c.mean:.2f}"
            parts.append(bound)
        op = " < " if self.strict else " <= "
        return parts[0] + op + "; ".join(parts[1:])


def cxr_claims(results: list[dict[str, Any]]) -> list[Claim]:
    claims: list[Claim] = []
    for var in CXR_TARGETS:
        if not results or var not in results[0].get("interventions", {}):
            continue

        def c(mode: str, metric: str, var: str = var) -> Cell:
            return cell(results, var, mode, metric)

        exact = reference_cell(results, var, "exact", "MAPE %")
        claims += [
            Claim("cxr-phantom", "Seg-CFT MAPE <= 1.25 x the exact counterfactual's", var, c("seg", "MAPE %"),
                  [("exact", exact, 1.25)]),
            Claim("cxr-phantom", "Seg-CFT change outside the structure <= 1.5 and <= Reg-CFT", var,
                  c("seg", "outside"), [("1.5/255", constant_cell(1.5, len(results)), 1.0),
                                        ("reg", c("reg", "outside"), 1.0)]),
            Claim("cxr-phantom", "Seg-CFT exact-counterfactual error below none", var, c("seg", "exact-cf error"),
                  [("none", c("none", "exact-cf error"), 1.0)], strict=True),
            Claim("cxr-phantom", "Reg-CFT MAPE <= 0.8 x none", var, c("reg", "MAPE %"),
                  [("none", c("none", "MAPE %"), 0.8)]),
            Claim("cxr-phantom", "Seg-CFT MAPE below Reg-CFT", var, c("seg", "MAPE %"),
                  [("reg", c("reg", "MAPE %"), 1.0)], strict=True),
        ]
    return claims


def ccta_claims(results: list[dict[str, Any]]) -> list[Claim]:
    claims: list[Claim] = []
    for var in CCTA_TARGETS:
        if not results or var not in results[0].get("interventions", {}):
            continue

        def c(mode: str, metric: str, var: str = var) -> Cell:
            return cell(results, var, mode, metric)

        claims += [
            Claim("ccta-phantom", "exact counterfactual's per-region MAPE <= 10 (the segmentors resolve plaque)",
                  var, reference_cell(results, var, "exact", "MAPE %"),
                  [("10 %", constant_cell(10.0, len(results)), 1.0)]),
            Claim("ccta-phantom", "Pos-Seg-CFT per-region MAPE <= 0.5 x none", var, c("pos-seg", "MAPE %"),
                  [("none", c("none", "MAPE %"), 0.5)]),
            Claim("ccta-phantom", "Pos-Seg-CFT change outside the intervened region <= Reg-CFT", var,
                  c("pos-seg", "outside region"), [("reg", c("reg", "outside region"), 1.0)]),
            Claim("ccta-phantom", "Pos-Seg-CFT's lumen follows the plaque (lumen MAPE below none's)", var,
                  descendant_cell(results, var, "pos-seg", "lumen_volume"),
                  [("none", descendant_cell(results, var, "none", "lumen_volume"), 1.0)], strict=True),
        ]
    return claims


CLAIMS: dict[str, Callable[[list[dict[str, Any]]], list[Claim]]] = {
    "cxr-phantom": cxr_claims,
    "ccta-phantom": ccta_claims,
}


BEGIN = "<!-- reproduce.py: {} (generated; rerun the script to change it) -->"
END = "<!-- reproduce.py: end of {} -->"
"""Markers around each generated block of REPRODUCTION.md. A rerun replaces only the blocks of the
datasets it aggregates and keeps everything else, hand-written sections included."""


def _header() -> list[str]:
    return [
        "# Reproduction of the Seg-CFT and Pos-Seg-CFT claims on the phantoms",
        "",
        "Each dataset's claims and tables are generated by `python benchmarks/reproduce.py`; each block says "
        "when and with which command. Every number is a test-split mean measured by the "
        "evaluation segmentor (trained apart from the guide) as in `segcft evaluate`; with several seeds a cell "
        "reads `mean over seeds (min–max over seeds)`, with one seed `mean [95% bootstrap interval]`. Image "
        "differences are on the 0-255 scale. Claims are judged on the mean over seeds; `seeds` counts the seeds "
        "in which the claim held on its own. Rows (unchanged) and (exact) score two reference images with the "
        "same segmentors: the factual image left unchanged (what a generator that ignores the intervened parent "
        "would score) and the exact counterfactual rendered from the same exogenous noise (the best any "
        "generator can score, i.e. the measurement floor of effectiveness and leakage). Sections outside the "
        "generated blocks are written by hand and kept by the script.",
        "",
        "## Claims",
    ]


def _claims_block(name: str, claims: list[Claim], provenance: str) -> list[str]:
    L = [f"### {name}", "", provenance, ""]
    if not claims:
        return [*L, "No run has finished: no claim could be checked."]
    L += ["| claim | do(variable) | numbers | held | seeds |", "|---|---|---|---|---|"]
    for c in claims:
        held = {True: "yes", False: "**no**", None: "not measured"}[c.held]
        ok, n = c.seeds_held()
        L.append(f"| {c.text} | {c.variable} | {c.numbers()} | {held} | {ok}/{n} |")
    return L


def _tables_block(
    name: str, results: list[dict[str, Any]], runs: Path, provenance: str, timings: dict[str, float]
) -> list[str]:
    L = [f"## {name}", "", provenance, ""]
    if not results:
        return [*L, f"No finished run under `{runs}`."]
    modes = [m for m in DATASETS[name]["modes"] if m in results[0].get("modes", [])]
    L += [f"{len(results)} run(s), {results[0]['n']} test subjects each.", ""]
    for var, entry in results[0]["interventions"].items():
        if not entry.get("structure"):
            continue
        metrics = ["MAPE %", "MAPE % (guide)", "leakage MAPE %", "outside", "inside"]
        if entry.get("region"):
            metrics.append("outside region")
        if results[0].get("phantom"):
            metrics += ["exact-cf error", "exact-cf error outside"]
        metrics.append("reversibility")
        unit = entry.get("unit", "")
        L += [f"### do({var})" + (f" [{unit}]" if unit else ""), ""]
        L.append("| mode | " + " | ".join(metrics) + " |")
        L.append("|" + "|".join("---" for _ in range(len(metrics) + 1)) + "|")
        for m in modes:
            L.append(f"| {m} | " + " | ".join(cell(results, var, m, k).text() for k in metrics) + " |")
        for ref in REFERENCE_ROWS:
            cells = [reference_cell(results, var, ref, k) for k in metrics]
            if any(math.isfinite(c.mean) for c in cells):
                L.append(f"| ({ref}) | " + " | ".join(c.text() for c in cells) + " |")
        L.append("")
    L += ["Composition (null interventions, 0-255):", "", "| mode | m = 1 | m = 10 |", "|---|---|---|"]
    for m in modes:
        c1 = Cell([_path(r, "composition", m, "m1") for r in results])
        c10 = Cell([_path(r, "composition", m, "m10") for r in results])
        L.append(f"| {m} | {c1.text()} | {c10.text()} |")
    mine = {path: sec for path, sec in timings.items() if Path(path).name.startswith(f"{name}-seed")}
    if mine:
        L += ["", "Wall time:", ""] + [f"- `{Path(path).name}`: {sec / 60:.1f} min" for path, sec in mine.items()]
    return L


def render_blocks(
    runs: Path, datasets: list[str], seeds: list[int], timings: dict[str, float], argv: list[str]
) -> list[tuple[str, str]]:
    """The generated blocks, in file order: (name, text). The header and the claims heading come
    first; then each dataset's claims, then each dataset's tables."""
    stamp = (f"Generated by `python benchmarks/reproduce.py {' '.join(argv)}` on {_dt.date.today().isoformat()} "
             f"({platform.platform()}, Python {platform.python_version()}).")
    claims, tables = [], []
    for name in datasets:
        results = load_metrics(runs, name, seeds)
        overrides = DATASETS[name]["overrides"]
        provenance = (f"{stamp} Quick preset, seeds {', '.join(map(str, seeds))}"
                      + (f"; {', '.join(overrides)}" if overrides else "") + ".")
        claims.append((f"claims {name}", "\n".join(_claims_block(name, CLAIMS[name](results), provenance))))
        tables.append((f"tables {name}", "\n".join(_tables_block(name, results, runs, provenance, timings))))
    return [("header", "\n".join(_header())), *claims, *tables]


def _wrap(name: str, body: str) -> str:
    return f"{BEGIN.format(name)}\n{body.rstrip()}\n{END.format(name)}"


ORDER = ["header"] + [f"claims {n}" for n in DATASETS] + [f"tables {n}" for n in DATASETS]
"""Where each block belongs when the file lacks it: after the blocks that precede it here."""


def merge(existing: str, blocks: list[tuple[str, str]]) -> str:
    """``existing`` with each of ``blocks`` replaced in place, or inserted after the last block that
    precedes it in ORDER (at the top when none does); text outside the markers is kept."""
    text = existing
    for name, body in blocks:
        begin, end = BEGIN.format(name), END.format(name)
        if begin in text:
            i, j = text.index(begin), text.index(end, text.index(begin)) + len(end)
            text = text[:i] + _wrap(name, body) + text[j:]
            continue
        at = 0
        for before in ORDER[: ORDER.index(name)]:
            marker = END.format(before)
            if marker in text:
                at = text.index(marker) + len(marker)
        sep_before = "\n\n" if at else ""
        after = "\n\n" if text[at:].strip() else "\n"
        text = text[:at] + sep_before + _wrap(name, body) + after + text[at:].lstrip("\n")
    return text.rstrip() + "\n"


def write_reproduction(
    runs: Path, datasets: list[str], seeds: list[int], out: Path, timings: dict[str, float], argv: list[str]
) -> str:
    """Regenerate the blocks of ``datasets`` in REPRODUCTION.md (``out``) from the runs' metrics.json
    files, keeping every other block and the hand-written text; returns the new file."""
    existing = out.read_text() if out.is_file() else ""
    text = merge(existing, render_blocks(runs, datasets, seeds, timings, argv))
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "reproduce", help="folder of the run folders")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (e.g. cft.steps=400)")
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "REPRODUCTION.md")
    p.add_argument("--report-only", action="store_true", help="only aggregate existing runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side, each in its own process with the CPUs split between them")
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # one --jobs worker
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs: expected a number >= 1, got {args.jobs}")
    timings: dict[str, float] = {}
    failed: list[str] = []
    if not args.report_only:
        if args.jobs > 1 and len(args.datasets) * len(args.seeds) > 1:
            timings, failed = train_parallel(
                args.datasets, args.seeds, args.runs, args.device, args.overrides, args.jobs
            )
        else:
            timings = train_all(args.datasets, args.seeds, args.runs, args.device, args.overrides)
    if args.train_only:
        return 0
    text = write_reproduction(args.runs, args.datasets, args.seeds, args.report, timings, argv)
    for name in args.datasets:
        begin = BEGIN.format(f"claims {name}")
        print(text[text.index(begin) + len(begin) : text.index(END.format(f"claims {name}"))].strip())
    print(f"report: {args.report}")
    if failed:
        print("runs that did not finish (the same command resumes them):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
