"""Evaluation of a trained run (docs/method.md section 6) and single-image what-ifs.

``evaluate_run`` measures, for every fine-tuning mode and every intervened variable on a split,
effectiveness and leakage (soft areas of an evaluation segmentor trained apart from the guide,
the guide's own figure beside it), locality, the error against the exact counterfactual on
phantoms, composition and reversibility, each with a 95% bootstrap interval over subjects, and
writes ``metrics.json``, ``report.md`` and ``figures/``.

``counterfactual`` answers one what-if for a TIFF file or a dataset sample and writes the
counterfactual in the input's dtype, intensity range and spacing.

Interventions are drawn as in counterfactual fine-tuning: for variable k the targets are the
split's own values of k permuted with a fixed seed; descendants follow through the mechanisms.
The same interventions, seeds and subjects are used for every mode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from segcft.checkpoint import atomic_write_text, write_json
from segcft.data.variables import DatasetInfo, Variable
from segcft.errors import UserError
from segcft.metrics import (
    abs_errors,
    bootstrap_mean,
    bootstrap_ratio,
    dilate,
    locality,
    masked_mean_abs,
    permutation,
    to_255,
)

__all__ = [
    "MODE_PREFERENCE",
    "ParsedIntervention",
    "counterfactual",
    "evaluate",
    "evaluate_run",
    "parse_intervention",
    "write_report",
]

MODE_PREFERENCE: tuple[str, ...] = ("pos-seg", "seg", "reg", "none")
"""Generator used by ``counterfactual`` when no mode is named: the first the run has."""

COMPOSITION_CYCLES: tuple[int, ...] = (1, 10)
REFERENCES: dict[str, str] = {
    "unchanged": "the factual image, unchanged (a generator that ignores the parent)",
    "exact": "the exact counterfactual (phantoms; the best these segmentors can grade)",
}
"""Reference images scored beside the modes for every structure intervention."""
_EVAL_BATCH = 16


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_run(run_dir: Path | str, split: str = "test", n: int | None = None) -> dict[str, Any]:
    """Load the run in ``run_dir`` and evaluate every fine-tuning mode on ``split`` (first ``n``
    samples, default the config's ``evaluate.n`` or all); writes metrics.json, report.md and
    figures/ into the run folder and returns the metrics."""
    from segcft.run import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run: {run_dir} is not a run folder")
    run = load_run(run_dir)
    return evaluate(run, run_dir, split=split, n=n)


def evaluate(
    run: Any,
    out_dir: Path | str,
    split: str = "test",
    n: int | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate a loaded run (``segcft.run.Run`` or any object with the same attributes) and
    write metrics.json, report.md and (unless ``figures`` is False) figures/ into ``out_dir``."""
    out_dir = Path(out_dir)
    cfg = run.config
    ecfg = cfg.evaluate
    info: DatasetInfo = run.info
    device = torch.device(run.device)
    n = ecfg.n if n is None else n
    if n is not None and int(n) < 1:
        raise UserError(f"--n: expected a positive number of samples, got {n}")
    if not run.generators:
        raise UserError(f"run {out_dir}: no trained generator to evaluate")
    dataset = run.dataset(split)
    total = len(dataset)
    if total == 0:
        raise UserError(f"run {out_dir}: the {split!r} split is empty")
    count = total if n is None else min(int(n), total)
    data = _load_samples(dataset, count)
    phantom = callable(getattr(dataset, "render", None)) and "exogenous" in data
    seed = int(cfg.seed)
    batch_size = max(1, int(getattr(getattr(cfg, "cft", None), "batch_size", _EVAL_BATCH) or _EVAL_BATCH))
    particles = max(1, int(getattr(ecfg, "particles", 1)))
    dilation = int(ecfg.dilation)
    resamples = int(ecfg.bootstrap)

    eval_seg = run.eval_segmentor if run.eval_segmentor is not None else run.segmentor
    segmentors = [(who, seg) for who, seg in (("eval", eval_seg), ("guide", run.segmentor)) if seg is not None]
    for module in [run.mechanisms, *(s for _, s in segmentors), *run.generators.values()]:
        if module is not None:
            module.to(device).eval()

    meas = _Measurer(info)
    structures = info.structure_variables
    pa_all = data["parents"].float()
    acc = _Accumulator()
    fig_store: dict[str, dict[str, Any]] = {}

    with torch.inference_mode():
        # counterfactual parents of every intervention, shared by all modes
        pa_cf_all: dict[str, torch.Tensor] = {}
        for j, var in enumerate(info.variables):
            targets = pa_all[permutation(count, seed + 7919 * (j + 1)), j]
            pa_cf_all[var.name] = _mechanism_cf(run.mechanisms, pa_all.to(device), {var.name: targets.to(device)}).cpu()

        for sl in _batches(count, batch_size):
            b = _to_device(data, sl, device)
            x, regions = b["image"], b.get("regions")
            # measurement floor: segmentors on the factual images against the recorded values
            phys = info.denormalise(b["parents"].double())
            factual_areas = {}
            for who, seg in segmentors:
                areas = factual_areas[who] = meas(seg(x), regions)
                for var in structures:
                    j = info.index(var.name)
                    ae, ape = abs_errors(areas[:, j], phys[:, j], info.voxel_size)
                    acc.add(("factual", var.name, who, "ae"), ae)
                    acc.add(("factual", var.name, who, "ape"), ape)
            shared = [_intervention(info, meas, dataset, b, var, pa_cf_all[var.name][sl].to(device), phantom)
                      for var in info.variables]
            for iv in shared:
                if iv.var.is_structure:
                    _reference_metrics(acc, iv, segmentors, factual_areas, meas, info, regions)
            for mode, gen in run.generators.items():
                _evaluate_mode(
                    acc, fig_store if figures and sl.start == 0 else None, gen, mode, b, shared, segmentors,
                    meas, info, particles, dilation, seed, sl.start,
                )

    result = _summarise(acc, info, run, split, count, resamples, seed, dilation, phantom, particles)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures and fig_store:
        from segcft.figures import counterfactual_grid

        paths = []
        for name, st in fig_store.items():
            paths.append(
                counterfactual_grid(
                    st["x"], st["cf"], st["seg"], out_dir / "figures" / f"cf_{_slug(name)}.png",
                    title=f"do({name}), {split} sample 0", factual_mask=st["mask"], focus=st["mask"],
                ).name
            )
        result["figures"] = sorted(paths)
    write_json(out_dir / "metrics.json", _json_safe(result))
    atomic_write_text(out_dir / "report.md", write_report(result))
    return result


@dataclass
class _Intervention:
    """What one intervention on one batch shares across modes: the counterfactual parents, their
    physical values, the factual structure mask and, on phantoms, the exact counterfactual."""

    index: int
    var: Variable
    pa_cf: torch.Tensor  # (B, P) normalised
    phys_cf: torch.Tensor  # (B, P) float64, physical units
    fact_mask: torch.Tensor | None  # (B, *S) bool, structure variables only
    true_image: torch.Tensor | None  # (B, 1, *S), phantoms only
    true_mask: torch.Tensor | None  # (B, *S) bool, structure variables on phantoms only


def _intervention(
    info: DatasetInfo, meas: "_Measurer", dataset: Any, b: Mapping[str, torch.Tensor], var: Variable,
    pa_cf: torch.Tensor, phantom: bool,
) -> _Intervention:
    """Everything about one intervention on one batch that does not depend on the generator."""
    phys_cf = info.denormalise(pa_cf.double())
    regions = b.get("regions")
    fact_mask = meas.structure_mask(var, b["mask"], regions) if var.is_structure else None
    true_image = true_mask = None
    if phantom:
        image, mask, t_regions = dataset.render(b["exogenous"].cpu(), phys_cf.float().cpu())
        device = b["image"].device
        true_image = image.to(device).float()
        if var.is_structure:
            t_regions = t_regions.to(device).long() if t_regions is not None else regions
            true_mask = meas.structure_mask(var, mask.to(device).long(), t_regions)
    return _Intervention(info.index(var.name), var, pa_cf, phys_cf, fact_mask, true_image, true_mask)


def _reference_metrics(
    acc: "_Accumulator",
    iv: _Intervention,
    segmentors: list[tuple[str, Any]],
    factual_areas: Mapping[str, torch.Tensor],
    meas: "_Measurer",
    info: DatasetInfo,
    regions: torch.Tensor | None,
) -> None:
    """Effectiveness and leakage of two reference images for one structure intervention: the
    factual image left unchanged (what a generator that ignores the parent scores) and, on
    phantoms, the exact counterfactual (the best any generator can score with these
    segmentors). They bracket every mode's figures; recorded as modes named ``ref:<name>``."""
    for who, seg in segmentors:
        _score_areas(acc, (iv.var.name, "ref:unchanged"), who, factual_areas[who], iv, info)
        if iv.true_image is not None:
            _score_areas(acc, (iv.var.name, "ref:exact"), who, meas(seg(iv.true_image), regions), iv, info)


def _score_areas(
    acc: "_Accumulator", key: tuple[str, str], who: str, areas: torch.Tensor, iv: _Intervention, info: DatasetInfo
) -> None:
    """Errors of measured areas against the intervention's counterfactual values: every structure
    variable under ``("cf", *key, who, name)``, the mean over the non-intervened ones (leakage)
    under ``("leak", *key, who)``."""
    leak = []
    for s in info.structure_variables:
        js = info.index(s.name)
        ae, ape = abs_errors(areas[:, js], iv.phys_cf[:, js], info.voxel_size)
        acc.add(("cf", *key, who, s.name, "ae"), ae)
        acc.add(("cf", *key, who, s.name, "ape"), ape)
        if s.name != iv.var.name:
            leak.append(ape)
    if leak:
        acc.add(("leak", *key, who), _nanmean_rows(torch.stack(leak, dim=1)))


def _evaluate_mode(
    acc: "_Accumulator",
    fig_store: dict[str, dict[str, Any]] | None,
    gen: Any,
    mode: str,
    b: Mapping[str, torch.Tensor],
    interventions: list[_Intervention],
    segmentors: list[tuple[str, Any]],
    meas: "_Measurer",
    info: DatasetInfo,
    particles: int,
    dilation: int,
    seed: int,
    start: int,
) -> None:
    """Every per-sample metric of one generator on one batch: composition, then effectiveness,
    leakage, locality, ground truth and reversibility of every intervention.

    x is abducted once; the counterfactual of every intervention and the first null
    intervention reuse its latents and pixel noise (docs/method.md section 3.3)."""
    x, pa, regions = b["image"], b["parents"].float(), b.get("regions")
    _seed_all(seed, start, 0)
    factual = _Abduction(gen, x, pa, particles)
    x_m = factual.null()
    _seed_all(seed, start, 1)
    for cycle in range(1, max(COMPOSITION_CYCLES) + 1):
        if cycle > 1:
            x_m = _Abduction(gen, x_m, pa, particles).null()
        if cycle in COMPOSITION_CYCLES:
            acc.add(("composition", mode, f"m{cycle}"), to_255(masked_mean_abs(x_m, x)))

    for iv in interventions:
        var, key = iv.var, (iv.var.name, mode)
        x_cf = factual.under(iv.pa_cf)
        cf_labels = None
        for who, seg in segmentors:
            logits = seg(x_cf)
            if who == "eval":
                cf_labels = logits.argmax(dim=1)
            _score_areas(acc, key, who, meas(logits, regions), iv, info)
        if iv.true_image is not None:
            acc.add(("gt", *key, "all"), to_255(masked_mean_abs(x_cf, iv.true_image)))
        if iv.fact_mask is not None:
            cf_mask = iv.true_mask if iv.true_mask is not None else meas.structure_mask(var, cf_labels, regions)
            union = iv.fact_mask | cf_mask
            loc = locality(x, x_cf, union, dilation)
            acc.add(("outside", *key), to_255(loc["outside"]))
            acc.add(("inside", *key), to_255(loc["inside"]))
            if iv.true_image is not None:
                outside = ~dilate(union, dilation)
                acc.add(("gt", *key, "outside"), to_255(masked_mean_abs(x_cf, iv.true_image, outside)))
            if var.measure.region is not None and regions is not None:
                region = dilate(regions == info.region_id(var.measure.region), dilation)
                acc.add(("outside_region", *key), to_255(masked_mean_abs(x_cf, x, ~region)))
        _seed_all(seed, start, 10_000 + iv.index)
        x_back = _Abduction(gen, x_cf, iv.pa_cf, particles).under(pa)
        acc.add(("reversibility", *key), to_255(masked_mean_abs(x_back, x)))
        if fig_store is not None and iv.fact_mask is not None:
            store = fig_store.setdefault(var.name, {"x": x[0].cpu().numpy(), "cf": {}, "seg": {}})
            store["mask"] = iv.fact_mask[0].cpu().numpy()
            store["cf"][mode] = x_cf[0].cpu().numpy()
            if cf_labels is not None:
                store["seg"][mode] = cf_labels[0].cpu().numpy()


class _Abduction:
    """Latents z ~ q(z | x, pa) (``particles`` draws per subject, particle-major) and the pixel
    noise u = (x - mu) / sigma under the factual parents: a counterfactual under any parents
    then costs one decode, x_cf = clamp(mu* + sigma* u, -1, 1), averaged over particles."""

    def __init__(self, gen: Any, x: torch.Tensor, pa: torch.Tensor, particles: int) -> None:
        self.gen = gen
        self.particles = particles
        self.x = _tile(x, particles)
        self.pa = _tile(pa, particles)
        self.latents = gen.abduct(self.x, self.pa)
        self.loc, self.scale = gen.decode(self.latents, self.pa)
        self.u = (self.x.float() - self.loc) / self.scale

    def null(self) -> torch.Tensor:
        """The counterfactual under the factual parents (x up to clamping and rounding)."""
        return self._mean((self.loc + self.scale * self.u).clamp(-1.0, 1.0))

    def under(self, pa_cf: torch.Tensor) -> torch.Tensor:
        """The counterfactual under the parents ``pa_cf`` (B, P)."""
        loc, scale = self.gen.decode(self.latents, _tile(pa_cf, self.particles))
        return self._mean((loc + scale * self.u).clamp(-1.0, 1.0))

    def _mean(self, x_cf: torch.Tensor) -> torch.Tensor:
        if self.particles == 1:
            return x_cf
        return x_cf.reshape(self.particles, -1, *x_cf.shape[1:]).mean(0)


def _tile(t: torch.Tensor, times: int) -> torch.Tensor:
    """``times`` copies of a batch along the batch axis, copy-major."""
    return t if times == 1 else t.repeat(times, *([1] * (t.dim() - 1)))


class _Measurer:
    """Soft areas of every structure variable from segmentor logits, in physical units."""

    def __init__(self, info: DatasetInfo) -> None:
        self.info = info
        self.regional = any(v.measure and v.measure.region for v in info.structure_variables)

    def __call__(
        self, logits: torch.Tensor, regions: torch.Tensor | None, spacing: tuple[float, ...] | None = None
    ) -> torch.Tensor:
        """(B, C, *S) logits -> (B, P) float64 areas (NaN for non-structure variables);
        ``spacing`` per spatial axis in mm, default the dataset's."""
        from segcft.ops import soft_area

        info = self.info
        v = tuple(float(s) for s in (info.spacing if spacing is None else spacing))
        whole = soft_area(logits.float(), spacing=v).double()
        regional = None
        if self.regional and regions is not None:
            regional = soft_area(logits.float(), spacing=v, regions=regions.long(), num_regions=info.num_regions).double()
        out = torch.full((logits.shape[0], len(info.variables)), math.nan, dtype=torch.float64, device=logits.device)
        for var in info.structure_variables:
            j = info.index(var.name)
            c = info.class_index(var.measure.structure)
            if var.measure.region is None:
                out[:, j] = whole[:, c]
            elif regional is not None:
                out[:, j] = regional[:, c, info.region_id(var.measure.region)]
        return out

    def structure_mask(self, var: Variable, labels: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
        """(B, *S) bool mask of a structure variable: its class, restricted to its region."""
        m = labels == self.info.class_index(var.measure.structure)
        if var.measure.region is not None and regions is not None:
            m = m & (regions == self.info.region_id(var.measure.region))
        return m


class _Accumulator:
    """Per-sample values keyed by metric tuples, concatenated over batches."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], list[torch.Tensor]] = {}

    def add(self, key: tuple[str, ...], v: torch.Tensor) -> None:
        self.values.setdefault(key, []).append(v.detach().double().cpu().reshape(-1))

    def get(self, key: tuple[str, ...]) -> np.ndarray | None:
        vals = self.values.get(key)
        return None if vals is None else torch.cat(vals).numpy()


def _nanmean_rows(a: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(a)
    s = torch.where(finite, a, torch.zeros_like(a)).sum(1)
    c = finite.sum(1)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, math.nan))


def _mechanism_cf(mechanisms: Any, pa: torch.Tensor, interventions: dict[str, torch.Tensor]) -> torch.Tensor:
    return mechanisms.counterfactual(pa, interventions).to(pa.dtype)


def _seed_all(seed: int, start: int, salt: int) -> None:
    """Seed abduction noise per (batch, intervention): the same draws for every mode."""
    torch.manual_seed((int(seed) * 1_000_003 + int(start) * 101 + int(salt)) % (2**63 - 1))


def _batches(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _load_samples(dataset: Any, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` samples, stacked per key (label maps stored compactly)."""
    keys = ("image", "mask", "regions", "parents", "exogenous")
    cols: dict[str, list[torch.Tensor]] = {}
    for i in range(count):
        item = dataset[i]
        for k in keys:
            if k in item and item[k] is not None:
                v = torch.as_tensor(item[k])
                if k in ("mask", "regions"):
                    v = v.to(torch.int16)
                cols.setdefault(k, []).append(v)
    missing = [k for k in ("image", "mask", "parents") if k not in cols]
    if missing:
        raise UserError(f"dataset samples lack {missing}; every sample needs image, mask and parents")
    return {k: torch.stack(v) for k, v in cols.items()}


def _to_device(data: Mapping[str, torch.Tensor], sl: slice, device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in data.items():
        t = v[sl].to(device)
        out[k] = t.long() if k in ("mask", "regions") else t.float()
    return out


def _summarise(
    acc: _Accumulator,
    info: DatasetInfo,
    run: Any,
    split: str,
    count: int,
    resamples: int,
    seed: int,
    dilation: int,
    phantom: bool,
    particles: int,
) -> dict[str, Any]:
    """Bootstrap every per-sample metric into mean and 95% interval (same resamples for all)."""

    def ci(key: tuple[str, ...]) -> dict[str, float] | None:
        v = acc.get(key)
        return None if v is None else bootstrap_mean(v, resamples, seed)

    modes = list(run.generators)
    structures = [v.name for v in info.structure_variables]
    whos = [w for w, s in (("eval", run.eval_segmentor if run.eval_segmentor is not None else run.segmentor), ("guide", run.segmentor)) if s is not None]
    out: dict[str, Any] = {
        "dataset": info.name,
        "split": split,
        "n": count,
        "modes": modes,
        "seed": seed,
        "bootstrap": resamples,
        "dilation": dilation,
        "particles": particles,
        "phantom": phantom,
        "eval_segmentor": "separate" if run.eval_segmentor is not None else "guide (no separate evaluation segmentor)",
        "units": {v.name: v.unit for v in info.variables},
        "structures": structures,
        "regions": {v.name: v.measure.region for v in info.structure_variables if v.measure.region},
        "image_scale": "0-255",
    }
    out["factual"] = {
        s: {w: {"mae": ci(("factual", s, w, "ae")), "mape": ci(("factual", s, w, "ape"))} for w in whos}
        for s in structures
    }
    out["composition"] = {m: {f"m{c}": ci(("composition", m, f"m{c}")) for c in COMPOSITION_CYCLES} for m in modes}
    inter: dict[str, Any] = {}
    for var in info.variables:
        per_mode: dict[str, Any] = {}
        for m in modes:
            key = (var.name, m)
            entry: dict[str, Any] = {}
            if var.is_structure:
                entry["effectiveness"] = {
                    w: {"mae": ci(("cf", *key, w, var.name, "ae")), "mape": ci(("cf", *key, w, var.name, "ape"))}
                    for w in whos
                }
                outside, inside = acc.get(("outside", *key)), acc.get(("inside", *key))
                entry["locality"] = {
                    "outside": ci(("outside", *key)),
                    "inside": ci(("inside", *key)),
                    "ratio": bootstrap_ratio(outside, inside, resamples, seed),
                }
                if acc.get(("outside_region", *key)) is not None:
                    entry["locality"]["outside_region"] = ci(("outside_region", *key))
            others = [s for s in structures if s != var.name]
            entry["leakage"] = {
                "mape_mean": {w: ci(("leak", *key, w)) for w in whos} if others else None,
                "per_variable": {
                    s: {w: {"mae": ci(("cf", *key, w, s, "ae")), "mape": ci(("cf", *key, w, s, "ape"))} for w in whos}
                    for s in others
                },
            }
            if phantom:
                entry["ground_truth"] = {"all": ci(("gt", *key, "all")), "outside": ci(("gt", *key, "outside"))}
            entry["reversibility"] = ci(("reversibility", *key))
            per_mode[m] = entry
        references = {
            ref: {
                "effectiveness": {
                    w: {"mae": ci(("cf", var.name, f"ref:{ref}", w, var.name, "ae")),
                        "mape": ci(("cf", var.name, f"ref:{ref}", w, var.name, "ape"))}
                    for w in whos
                },
                "leakage": {"mape_mean": {w: ci(("leak", var.name, f"ref:{ref}", w)) for w in whos}},
            }
            for ref in REFERENCES
            if whos and acc.get(("cf", var.name, f"ref:{ref}", whos[0], var.name, "ape")) is not None
        }
        inter[var.name] = {
            "references": references,
            "type": var.type,
            "unit": var.unit,
            "structure": var.is_structure,
            "region": var.measure.region if var.measure else None,
            "descendants": sorted(info.descendants(var.name)),
            "modes": per_mode,
        }
    out["interventions"] = inter
    out["headline"] = _headline(out)
    return out


def _headline(result: Mapping[str, Any]) -> list[str]:
    """One line per mode: metrics averaged over the structure interventions."""
    lines = []
    structural = [e for e in result["interventions"].values() if e["structure"]]
    for m in result["modes"]:
        parts = []
        for label, path, unit in (
            ("MAPE", ("effectiveness", "eval", "mape"), "%"),
            ("leakage MAPE", ("leakage", "mape_mean", "eval"), "%"),
            ("change outside structure", ("locality", "outside"), ""),
            ("error vs exact cf", ("ground_truth", "all"), ""),
        ):
            vals = [(_get(e["modes"][m], *path) or {}).get("mean") for e in structural]
            vals = [v for v in vals if _finite(v)]
            if vals:
                parts.append(f"{label} {float(np.mean(vals)):.2f}{unit}")
        comp = _get(result, "composition", m, "m1", "mean")
        if _finite(comp):
            parts.append(f"composition {comp:.2f}")
        lines.append(f"{m}: " + (", ".join(parts) if parts else "no structure interventions"))
    return lines


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def fmt(ci: Mapping[str, float] | None, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a bootstrap summary; an en dash when undefined."""
    if not ci or ci.get("mean") is None or not _finite(ci["mean"]):
        return "–"
    m, lo, hi = ci["mean"], ci.get("lo"), ci.get("hi")
    if not (_finite(lo) and _finite(hi)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


def write_report(result: Mapping[str, Any]) -> str:
    """Markdown report of ``evaluate``'s result: headline summary, then one table per
    intervened variable (rows are modes), grouped per region for regional variables."""
    modes = result["modes"]
    units = result["units"]
    inter = result["interventions"]
    phantom = result["phantom"]
    L: list[str] = [f"# Evaluation: {result['dataset']} ({result['split']} split, {result['n']} subjects)", ""]
    L.append(
        f"Modes: {', '.join(modes)}. Means with 95% bootstrap intervals over subjects ({result['bootstrap']} "
        f"resamples, seed {result['seed']}). Effectiveness and leakage are measured by the evaluation segmentor "
        f"({result['eval_segmentor']}) as soft areas in physical units; image differences are on the 0-255 "
        f"scale; locality masks are dilated by {result['dilation']} voxels."
    )
    L.append("")
    L.append("## Headline")
    L.append("")
    L.append("Means over the structure interventions (image differences on the 0-255 scale):")
    L.append("")
    L += [f"- {line}" for line in result.get("headline", [])]
    L.append("")
    rows = []
    for name, entry in inter.items():
        if not entry["structure"]:
            continue
        for m in modes:
            e = entry["modes"][m]
            rows.append([
                name, m,
                fmt(_get(e, "effectiveness", "eval", "mape")),
                fmt(_get(e, "leakage", "mape_mean", "eval")),
                fmt(_get(e, "locality", "outside")),
                fmt(_get(e, "locality", "outside_region")) if entry["region"] else "–",
                fmt(_get(e, "ground_truth", "all")) if phantom else "–",
            ])
    if rows:
        L += _table(
            ["do(variable)", "mode", "MAPE % (eval)", "leakage MAPE %", "change outside structure",
             "change outside region", "error vs exact cf"],
            rows,
        )
    else:
        L.append("The dataset has no structure variables.")
    L.append("")
    L.append("Composition and reversibility (mean |difference|, 0-255):")
    L.append("")
    comp_rows = []
    for m in modes:
        rev = [(_get(entry["modes"][m], "reversibility") or {}).get("mean") for entry in inter.values()]
        rev = [r for r in rev if _finite(r)]
        comp_rows.append([
            m,
            fmt(_get(result, "composition", m, "m1")),
            fmt(_get(result, "composition", m, "m10")),
            f"{float(np.mean(rev)):.2f}" if rev else "–",
        ])
    L += _table(["mode", "composition m=1", "composition m=10", "reversibility (mean over interventions)"], comp_rows)
    L.append("")

    L.append("## Measurement floor")
    L.append("")
    L.append("Segmentors on the factual images against the recorded values.")
    L.append("")
    fl_rows = []
    for s, d in result["factual"].items():
        fl_rows.append([
            s, units.get(s, ""),
            fmt(_get(d, "eval", "mae")), fmt(_get(d, "eval", "mape")),
            fmt(_get(d, "guide", "mae")), fmt(_get(d, "guide", "mape")),
        ])
    if fl_rows:
        L += _table(["variable", "unit", "MAE (eval)", "MAPE % (eval)", "MAE (guide)", "MAPE % (guide)"], fl_rows)
        L.append("")

    groups: dict[str | None, list[str]] = {}
    for name, entry in inter.items():
        groups.setdefault(entry["region"], []).append(name)
    for region, names in groups.items():
        if region is not None:
            L.append(f"## Region: {region}")
            L.append("")
        for name in names:
            L += _variable_section(name, inter[name], modes, units, phantom, level="###" if region else "##")
    return "\n".join(L).rstrip() + "\n"


def _variable_section(
    name: str, entry: Mapping[str, Any], modes: list[str], units: Mapping[str, str], phantom: bool, level: str
) -> list[str]:
    unit = entry["unit"]
    L = [f"{level} do({name})" + (f" [{unit}]" if unit else ""), ""]
    if entry["descendants"]:
        L.append(f"Descendants (follow through the mechanisms): {', '.join(entry['descendants'])}.")
        L.append("")
    header = ["mode"]
    if entry["structure"]:
        header += [f"MAE {unit} (eval)", "MAPE % (eval)", f"MAE {unit} (guide)", "MAPE % (guide)",
                   "leakage MAPE % (eval)", "outside", "inside", "outside/inside"]
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
            r += [
                fmt(_get(e, "effectiveness", "eval", "mae"), 1), fmt(_get(e, "effectiveness", "eval", "mape")),
                fmt(_get(e, "effectiveness", "guide", "mae"), 1), fmt(_get(e, "effectiveness", "guide", "mape")),
                fmt(_get(e, "leakage", "mape_mean", "eval")),
                fmt(_get(e, "locality", "outside")), fmt(_get(e, "locality", "inside")),
                fmt(_get(e, "locality", "ratio"), 3),
            ]
            if entry["region"]:
                r.append(fmt(_get(e, "locality", "outside_region")))
        else:
            r += [fmt(_get(e, "leakage", "mape_mean", "eval")), fmt(_get(e, "leakage", "mape_mean", "guide"))]
        if phantom:
            r.append(fmt(_get(e, "ground_truth", "all")))
            if entry["structure"]:
                r.append(fmt(_get(e, "ground_truth", "outside")))
        r.append(fmt(_get(e, "reversibility")))
        rows.append(r)
    refs = entry.get("references") or {}
    for ref, e in refs.items():
        r = [f"({ref})"]
        if entry["structure"]:
            r += [
                fmt(_get(e, "effectiveness", "eval", "mae"), 1), fmt(_get(e, "effectiveness", "eval", "mape")),
                fmt(_get(e, "effectiveness", "guide", "mae"), 1), fmt(_get(e, "effectiveness", "guide", "mape")),
                fmt(_get(e, "leakage", "mape_mean", "eval")),
            ]
        rows.append(r + ["–"] * (len(header) - len(r)))
    L += _table(header, rows)
    L.append("")
    if refs:
        L.append("Reference rows: " + "; ".join(f"({ref}) {REFERENCES[ref]}" for ref in refs) + ".")
        L.append("")
    others = list((_get(entry["modes"][modes[0]], "leakage", "per_variable") or {}).keys())
    if others:
        label = "Leakage" if entry["structure"] else "Structures"
        L.append(f"{label}: MAPE % (eval) of each other structure variable against its counterfactual value.")
        L.append("")
        rows = [[m] + [fmt(_get(entry["modes"][m], "leakage", "per_variable", s, "eval", "mape")) for s in others] for m in modes]
        L += _table(["mode"] + others, rows)
        L.append("")
    return L


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


# ---------------------------------------------------------------------------------------------
# single what-if
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedIntervention:
    """``VAR=70`` (absolute), ``VAR=+20%`` (relative) or ``VAR=x1.2`` (factor), physical units."""

    variable: str
    kind: str  # "absolute" | "relative" | "factor"
    value: float

    def apply(self, current: float) -> float:
        """The intended physical value given the subject's current value."""
        if self.kind == "absolute":
            return self.value
        if self.kind == "relative":
            return current * (1.0 + self.value / 100.0)
        return current * self.value


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def parse_intervention(text: str, info: DatasetInfo) -> ParsedIntervention:
    """Parse one ``--do`` argument; UserError naming it when the variable or value is invalid."""
    if "=" not in text:
        raise UserError(f"--do {text!r}: expected VARIABLE=VALUE, e.g. age=70, left_lung_area=+20% or heart_area=x1.2")
    name, raw = (s.strip() for s in text.split("=", 1))
    if name not in info.variable_names:
        raise UserError(f"--do {text!r}: unknown variable {name!r}; known: {', '.join(info.variable_names)}")
    var = info.variable(name)
    if re.fullmatch(_NUMBER + "%", raw) and raw[0] in "+-":
        kind, value = "relative", float(raw[:-1])
    elif re.fullmatch(r"[xX*]" + _NUMBER, raw):
        kind, value = "factor", float(raw[1:])
    elif re.fullmatch(_NUMBER, raw):
        kind, value = "absolute", float(raw)
    else:
        raise UserError(
            f"--do {text!r}: cannot read {raw!r}; expected a number (70), a signed percentage (+20%) or a factor (x1.2)"
        )
    if not math.isfinite(value):
        raise UserError(f"--do {text!r}: the value must be finite")
    if var.type == "binary" and (kind != "absolute" or value not in (0.0, 1.0)):
        raise UserError(f"--do {text!r}: {name!r} is binary; expected {name}=0 or {name}=1")
    if kind == "factor" and value < 0:
        raise UserError(f"--do {text!r}: a factor must be >= 0")
    return ParsedIntervention(name, kind, value)


def counterfactual(
    run_dir: Path | str,
    input: str | Path,
    interventions: list[str],
    out: Path | str,
    png: Path | str | None = None,
    particles: int = 1,
    mode: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Answer one what-if: abduct the input (a TIFF file, or a sample id such as ``test:12``),
    apply the interventions, let descendants follow through the mechanisms, and write the
    counterfactual to ``out`` in the input's dtype, intensity range and spacing.

    ``mode`` picks the generator (default: the first of pos-seg, seg, reg, none the run has).
    Prints the intended and measured values before and after through ``echo``."""
    from segcft.run import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run: {run_dir} is not a run folder")
    if not interventions:
        raise UserError("--do: give at least one intervention, e.g. --do left_lung_area=+20%")
    if int(particles) < 1:
        raise UserError(f"--particles: expected a positive integer, got {particles}")
    run = load_run(run_dir)
    return counterfactual_with(run, input, interventions, out, png=png, particles=particles, mode=mode, echo=echo)


def counterfactual_with(
    run: Any,
    input: str | Path,
    interventions: list[str],
    out: Path | str,
    png: Path | str | None = None,
    particles: int = 1,
    mode: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``counterfactual`` on a loaded run (see there)."""
    info: DatasetInfo = run.info
    device = torch.device(run.device)
    parsed = [parse_intervention(t, info) for t in interventions]
    seen: set[str] = set()
    for p in parsed:
        if p.variable in seen:
            raise UserError(f"--do: {p.variable!r} is given twice")
        seen.add(p.variable)
    if mode is None:
        mode = next((m for m in MODE_PREFERENCE if m in run.generators), next(iter(run.generators), None))
    if mode not in run.generators:
        raise UserError(f"--mode: the run has no {mode!r} generator; available: {', '.join(run.generators)}")
    gen = run.generators[mode]
    guide = run.segmentor
    eval_seg = run.eval_segmentor if run.eval_segmentor is not None else guide
    for module in (gen, guide, eval_seg, run.mechanisms, run.regressor):
        if module is not None:
            module.to(device).eval()
    src = _read_input(run, input)
    x = src.image.to(device)
    regions = None if src.regions is None else src.regions.to(device)
    meas = _Measurer(info)
    notes = list(src.notes)
    with torch.no_grad():
        if src.parents is None:
            pa = _abduct_parents(run, x, regions, src.spacing, meas)
            notes.append(
                "parents abducted: structure variables measured by the guide segmentor (soft areas), "
                "subject variables predicted by the regressor"
            )
        else:
            pa = src.parents.to(device).float().reshape(1, -1)
        phys = info.denormalise(pa.double())[0]
        intended = phys.clone()
        targets: dict[str, torch.Tensor] = {}
        for p in parsed:
            j = info.index(p.variable)
            value = p.apply(float(phys[j]))
            var = info.variables[j]
            if var.is_structure and value < 0:
                raise UserError(f"--do {p.variable}: the intended value {value:g} {var.unit} is negative")
            mean, std = info.normalisation.mean[j], info.normalisation.std[j]
            targets[p.variable] = torch.tensor([(value - mean) / std], dtype=pa.dtype, device=device)
            if not (math.isfinite(value) and bool(torch.isfinite(targets[p.variable]).all())):
                raise UserError(
                    f"--do {p.variable}: the intended value {value:g} {var.unit} is out of the model's range "
                    f"(not finite once normalised)"
                )
        pa_cf = _mechanism_cf(run.mechanisms, pa, targets)
        bad = [name for name, ok in zip(info.variable_names, torch.isfinite(pa_cf).all(0).tolist()) if not ok]
        if bad:
            raise UserError(
                f"--do {', '.join(interventions)}: the counterfactual value of {', '.join(bad)} is not finite; "
                "the intervention is out of the range the mechanisms can handle (nothing written)"
            )
        intended = info.denormalise(pa_cf.double())[0]
        torch.manual_seed(int(run.config.seed))
        x_cf, var_map = gen.counterfactual(x, pa, pa_cf, particles=int(particles))
        if not bool(torch.isfinite(x_cf).all()):
            raise UserError(
                f"--do {', '.join(interventions)}: the {mode!r} generator's counterfactual image has NaN or "
                "infinite pixels (nothing written)"
            )
        before = meas(eval_seg(x), regions, src.spacing)[0] if eval_seg is not None else None
        after = meas(eval_seg(x_cf), regions, src.spacing)[0] if eval_seg is not None else None

    out = Path(out)
    arr = src.from_unit(x_cf[0, 0].cpu().numpy())
    _write_tiff(out, arr, src.spacing)
    std_path = None
    std = None
    if var_map is not None and int(particles) > 1:
        std = var_map[0, 0].clamp_min(0).sqrt().cpu().numpy()
        std_path = out.with_name(out.stem + "_std" + (out.suffix or ".tif"))
        _write_tiff(std_path, (std * src.half_range).astype(np.float32), src.spacing)
    if png is not None:
        from segcft.figures import counterfactual_png

        focus = None
        if after is not None:
            changed = [v for v in info.structure_variables if v.name in targets]
            if changed:
                focus = meas.structure_mask(changed[0], eval_seg(x_cf).argmax(1), regions)[0].cpu().numpy()
        counterfactual_png(
            x[0, 0].cpu().numpy(), x_cf[0, 0].cpu().numpy(), png, std=std,
            title=", ".join(interventions) + f" ({mode})", focus=focus,
        )

    rows: dict[str, dict[str, Any]] = {}
    for j, var in enumerate(info.variables):
        rows[var.name] = {
            "unit": var.unit,
            "intervened": var.name in targets,
            "before": float(phys[j]),
            "intended": float(intended[j]),
            "measured_before": None if before is None or not var.is_structure else float(before[j]),
            "measured_after": None if after is None or not var.is_structure else float(after[j]),
        }
    result = {
        "input": str(input),
        "output": str(out),
        "png": None if png is None else str(png),
        "uncertainty": None if std_path is None else str(std_path),
        "mode": mode,
        "abducted": src.parents is None,
        "spacing": list(src.spacing),
        "dtype": str(src.dtype),
        "variables": rows,
    }
    for line in _what_if_lines(result, notes, src):
        echo(line)
    return result


def _what_if_lines(result: Mapping[str, Any], notes: list[str], src: "_Input") -> list[str]:
    spacing = " x ".join(f"{s:g}" for s in result["spacing"])
    lines = [f"input {result['input']}: shape {tuple(src.image.shape[2:])}, {result['dtype']}, spacing {spacing} mm"]
    lines += notes
    lines.append(f"generator: {result['mode']}; measured by the evaluation segmentor (soft areas)")
    header = f"{'variable':<24} {'unit':<6} {'before':>12} {'intended':>12} {'measured before':>16} {'measured after':>15}"
    lines.append(header)

    def num(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}"

    for name, r in result["variables"].items():
        mark = "*" if r["intervened"] else " "
        lines.append(
            f"{mark}{name:<23} {r['unit']:<6} {num(r['before']):>12} {num(r['intended']):>12} "
            f"{num(r['measured_before']):>16} {num(r['measured_after']):>15}"
        )
    lines.append(f"wrote {result['output']}" + (f", {result['uncertainty']}" if result["uncertainty"] else "") + (f", {result['png']}" if result["png"] else ""))
    return lines


@dataclass
class _Input:
    """An input image in the generator's [-1, 1] window, with what is needed to undo it."""

    image: torch.Tensor  # (1, 1, *S)
    parents: torch.Tensor | None  # (P,) normalised, None for files
    regions: torch.Tensor | None  # (1, *S)
    spacing: tuple[float, ...]
    dtype: np.dtype
    lo: float
    hi: float
    notes: list[str]

    @property
    def half_range(self) -> float:
        return (self.hi - self.lo) / 2.0

    def from_unit(self, a: np.ndarray) -> np.ndarray:
        """[-1, 1] -> the input's intensity range and dtype (rounded and clipped for integers)."""
        v = (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) * self.half_range + self.lo
        if np.issubdtype(self.dtype, np.integer):
            lim = np.iinfo(self.dtype)
            v = np.clip(np.rint(v), max(lim.min, self.lo), min(lim.max, self.hi))
        elif self.dtype == np.bool_:
            v = v >= 0.5 * (self.lo + self.hi)
        return v.astype(self.dtype)


_SAMPLE_ID = re.compile(r"^(?:(train|val|test):)?(\d+)$")


def _read_input(run: Any, input: str | Path) -> _Input:
    info: DatasetInfo = run.info
    text = str(input)
    m = _SAMPLE_ID.fullmatch(text.strip())
    if m and not Path(text).exists():
        split, idx = m.group(1) or "test", int(m.group(2))
        ds = run.dataset(split)
        if idx >= len(ds):
            raise UserError(f"--input {text!r}: the {split} split has {len(ds)} samples (0..{len(ds) - 1})")
        item = ds[idx]
        image = torch.as_tensor(item["image"]).float().unsqueeze(0)
        regions = item.get("regions")
        return _Input(
            image=image,
            parents=torch.as_tensor(item["parents"]).float(),
            regions=None if regions is None else torch.as_tensor(regions).long().unsqueeze(0),
            spacing=tuple(info.spacing),
            dtype=np.dtype(np.float32),
            lo=-1.0,
            hi=1.0,
            notes=[f"parents: recorded values of {split} sample {idx}"],
        )
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--input {text!r}: no such TIFF file, and not a sample id such as test:12")
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise UserError(f"--input {path}: expected a .tif/.tiff file")
    array, spacing = _read_tiff(path)
    squeezed = np.squeeze(array)
    if squeezed.ndim != info.spatial_dims or tuple(squeezed.shape) != tuple(info.shape):
        raise UserError(
            f"--input {path}: image of shape {tuple(array.shape)} does not fit the run's "
            f"{info.spatial_dims}D images of shape {tuple(info.shape)}"
        )
    if squeezed.dtype.kind not in "biuf":
        raise UserError(f"--input {path}: unsupported pixel type {squeezed.dtype}")
    values = squeezed.astype(np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"--input {path}: the image contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise UserError(f"--input {path}: the image is constant ({lo:g}); nothing to edit")
    unit = torch.from_numpy(((values - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32))
    notes = [f"intensity window of the input: [{lo:g}, {hi:g}] -> [-1, 1]"]
    if spacing is None:
        spacing = tuple(info.spacing)
        notes.append("no spacing in the TIFF tags: using the run's spacing")
    elif any(abs(a - b) > 1e-3 * max(abs(b), 1e-12) for a, b in zip(spacing, info.spacing)):
        notes.append(
            f"warning: the input's spacing {tuple(spacing)} differs from the run's {tuple(info.spacing)}; "
            "areas use the input's spacing"
        )
    regional = [v.name for v in info.structure_variables if v.measure.region]
    if regional:
        raise UserError(
            f"--input {path}: the run has region-level variables ({', '.join(regional)}) and a TIFF file carries no "
            "region map; use a sample id such as test:12"
        )
    return _Input(
        image=unit.reshape(1, 1, *info.shape),
        parents=None,
        regions=None,
        spacing=tuple(float(s) for s in spacing),
        dtype=squeezed.dtype,
        lo=lo,
        hi=hi,
        notes=notes,
    )


def _abduct_parents(
    run: Any, x: torch.Tensor, regions: torch.Tensor | None, spacing: tuple[float, ...], meas: _Measurer
) -> torch.Tensor:
    """Normalised parents (1, P) of an image without a record: structure variables from the
    guide segmentor's soft areas, subject variables from the regressor."""
    info: DatasetInfo = run.info
    pa = torch.zeros(1, len(info.variables), dtype=torch.float32, device=x.device)
    subject = [v for v in info.variables if not v.is_structure]
    if subject:
        if run.regressor is None:
            raise UserError(
                f"the run has no regressor to predict {', '.join(v.name for v in subject)} of a file input; "
                "use a sample id such as test:12"
            )
        loc = run.regressor(x)["loc"].float()
        for v in subject:
            j = info.index(v.name)
            pa[:, j] = (loc[:, j] > 0).float() if v.type == "binary" else loc[:, j]
    if info.structure_variables:
        areas = meas(run.segmentor(x), regions, spacing)
        for v in info.structure_variables:
            j = info.index(v.name)
            mean, std = info.normalisation.mean[j], info.normalisation.std[j]
            pa[:, j] = ((areas[:, j] - mean) / std).float()
    return pa


_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}
_IMAGEJ_UNITS = {"mm": 1.0, "millimeter": 1.0, "cm": 10.0, "um": 1e-3, "µm": 1e-3, "micron": 1e-3, "m": 1000.0}


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Pixels and spacing in mm (slowest axis first) from segcft metadata, ImageJ metadata or
    the resolution tags; None when the file records no physical spacing."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            array = tif.asarray()
            ndim = np.squeeze(array).ndim
            shaped = tif.shaped_metadata
            if shaped and isinstance(shaped[0], dict) and "spacing" in shaped[0]:
                sp = tuple(float(s) for s in shaped[0]["spacing"])
                if len(sp) == ndim:
                    return array, sp
            page = tif.pages.first
            tags = page.tags
            ij = tif.imagej_metadata or {}
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            unit_tag = tags.get("ResolutionUnit")
            unit = int(unit_tag.value) if unit_tag is not None else 2
            if unit == 1:
                scale = _IMAGEJ_UNITS.get(str(ij.get("unit", "")).lower())
            else:
                scale = _MM_PER_UNIT.get(unit)
            if xr is None or yr is None or scale is None:
                return array, None
            xs = scale * xr.value[1] / xr.value[0]
            ys = scale * yr.value[1] / yr.value[0]
            if ndim == 2:
                return array, (ys, xs)
            if "spacing" in ij:
                return array, (scale * float(ij["spacing"]), ys, xs)
            return array, None
    except (tifffile.TiffFileError, OSError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"--input {path}: cannot read the TIFF file: {e}") from None


def _write_tiff(path: Path, array: np.ndarray, spacing: tuple[float, ...]) -> None:
    """Write ``array`` with its spacing in mm: resolution tags (pixels per cm) for the in-plane
    axes and segcft's JSON metadata for all axes (read back by ``_read_tiff``)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    ys, xs = spacing[-2], spacing[-1]
    tifffile.imwrite(
        path,
        array,
        resolution=(10.0 / xs, 10.0 / ys),
        resolutionunit="CENTIMETER",
        photometric="minisblack",
        metadata={"spacing": [float(s) for s in spacing], "unit": "mm"},
    )
