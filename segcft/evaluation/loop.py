"""The evaluation loop (docs/method.md section 6): every fine-tuning mode and every intervened
variable on one split, scored batch by batch into :class:`~segcft.evaluation.records.Scores`.

Interventions are drawn as in counterfactual fine-tuning: for variable k the targets are the
split's own values of k permuted with a fixed seed; descendants follow through the mechanisms.
The same interventions, seeds and subjects are used for every mode. Counterfactual images are
the ``DSCM``'s (``DSCM.abduct``: x is abducted once per batch and decoded per intervention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segcft.data.variables import DatasetInfo, Variable
from segcft.dscm import DSCM
from segcft.errors import UserError
from segcft.evaluation.checks import RegressorCheck, floor_marks, responsiveness, warnings
from segcft.evaluation.measure import Measurer
from segcft.evaluation.records import (
    AreaError,
    Change,
    Composition,
    ExactError,
    Floor,
    Leakage,
    Reversibility,
    Scores,
)
from segcft.evaluation.report import Context, headline, summarise, write_outputs
from segcft.metrics import abs_errors, dilate, locality, masked_mean_abs, permutation, to_255

__all__ = ["COMPOSITION_CYCLES", "evaluate", "evaluate_run"]

COMPOSITION_CYCLES: tuple[int, ...] = (1, 10)
_EVAL_BATCH = 16


def evaluate_run(run_dir: Path | str, split: str = "test", n: int | None = None) -> dict[str, Any]:
    """Load the run in ``run_dir`` and evaluate every fine-tuning mode on ``split`` (first ``n``
    samples, default the config's ``evaluate.n`` or all); writes metrics.json, report.md and
    figures/ into the run folder and returns the metrics."""
    from segcft.run import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run: {run_dir} is not a run folder")
    run = load_run(run_dir)
    if torch.device(run.device).type == "cpu":
        from segcft.train.context import keep_freed_memory

        keep_freed_memory()
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
    n = run.config.evaluate.n if n is None else n
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
    ev = _Evaluation(run, dataset, data, count)
    fig_store: dict[str, dict[str, Any]] | None = {} if figures else None
    with torch.inference_mode():
        ev.run(fig_store)
    ctx = Context(
        run=run,
        split=split,
        count=count,
        resamples=int(run.config.evaluate.bootstrap),
        seed=ev.seed,
        dilation=ev.dilation,
        phantom=ev.phantom,
        particles=ev.particles,
        cycles=COMPOSITION_CYCLES,
    )
    result = summarise(ev.scores, ctx)
    _add_checks(result, ev, run, split)
    return write_outputs(out_dir, result, fig_store or {}, split, run.info)


def _add_checks(result: dict[str, Any], ev: _Evaluation, run: Any, split: str) -> None:
    """The responsiveness and regressor sections, the floor marks (from the run folder's
    gates.json when there is one) and the warnings; the headline again, with its marks."""
    from segcft.run import RunDir

    result["responsiveness"] = ev.responsiveness
    if ev.regressor_check is not None:
        result["regressor"] = ev.regressor_check.summary(split)
    run_dir = getattr(run, "run_dir", None)
    gates = RunDir(run_dir).read_gates() if run_dir is not None else {}
    result["floor_marks"] = floor_marks(result, gates, float(getattr(run.config.evaluate, "floor_mark", 0.0)))
    result["warnings"] = warnings(result)
    result["headline"] = headline(result)


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


class _Evaluation:
    """One evaluation of a loaded run on the first ``count`` samples of a split."""

    def __init__(self, run: Any, dataset: Any, data: dict[str, torch.Tensor], count: int) -> None:
        cfg, ecfg = run.config, run.config.evaluate
        self.info: DatasetInfo = run.info
        self.device = torch.device(run.device)
        self.dataset, self.data, self.count = dataset, data, count
        self.phantom = callable(getattr(dataset, "render", None)) and "exogenous" in data
        self.seed = int(cfg.seed)
        self.batch_size = max(1, int(getattr(getattr(cfg, "cft", None), "batch_size", _EVAL_BATCH) or _EVAL_BATCH))
        self.particles = max(1, int(getattr(ecfg, "particles", 1)))
        self.dilation = int(ecfg.dilation)
        eval_seg = run.eval_segmentor if run.eval_segmentor is not None else run.segmentor
        self.segmentors = [(w, s) for w, s in (("eval", eval_seg), ("guide", run.segmentor)) if s is not None]
        for module in [run.mechanisms, *(s for _, s in self.segmentors), *run.generators.values()]:
            if module is not None:
                module.to(self.device).eval()
        self.dscms = {mode: DSCM(self.info, run.mechanisms, gen) for mode, gen in run.generators.items()}
        self.meas = Measurer(self.info)
        self.scores = Scores()
        self.regressor = getattr(run, "regressor", None)
        if self.regressor is not None:
            self.regressor.to(self.device).eval()
        # the regressor read through its stage's calibration, beside its raw prediction (method.md 5.7)
        calibration = getattr(run, "regressor_calibration", None)
        self.calibrated = None
        if self.regressor is not None and calibration is not None:
            from segcft.models.calibration import CalibratedRegressor

            self.calibrated = CalibratedRegressor(self.regressor, calibration, self.info).to(self.device)
        self.regressor_check = (
            RegressorCheck(
                self.info,
                self.calibrated.summary() if self.calibrated is not None else None,
                reg_cft_reads="calibrated" if self.calibrated is not None and cfg.cft.calibrate_regressor else "raw",
            )
            if self.regressor is not None
            else None
        )
        self.guide = run.segmentor if run.segmentor is not None else eval_seg
        self.responsiveness_n = min(count, int(getattr(ecfg, "responsiveness_n", 0)))
        # m = 10 costs nine abductions and decodes per subject and mode: a fifth of a 3D evaluation
        self.composition_n = min(count, int(getattr(ecfg, "composition_n", count)))
        self.responsiveness: dict[str, Any] = {}

    def run(self, fig_store: dict[str, dict[str, Any]] | None) -> None:
        """Score every batch: measurement floor, reference images, then every mode."""
        pa_cf_all = self._parents_counterfactuals()
        for sl in _batches(self.count, self.batch_size):
            b = _to_device(self.data, sl, self.device)
            factual_areas = self._floor(b)
            shared = [
                self._intervention(b, var, pa_cf_all[var.name][sl].to(self.device)) for var in self.info.variables
            ]
            for iv in shared:
                if iv.var.is_structure:
                    self._references(iv, factual_areas, b.get("regions"))
            self._regressor(b, shared)
            for mode, dscm in self.dscms.items():
                store = fig_store if fig_store is not None and sl.start == 0 else None
                _ModeScorer(self, mode, dscm, b, sl.start).run(shared, store)
        if self.guide is not None and self.responsiveness_n > 0:
            first = _to_device(self.data, slice(0, self.responsiveness_n), self.device)
            self.responsiveness = responsiveness(
                self.info, self.dscms, self.guide, first, self.data["parents"], self.seed, self.batch_size
            )

    def _regressor(self, b: Mapping[str, torch.Tensor], shared: list[_Intervention]) -> None:
        """The regressor on the factual images and, on phantoms, on every exact counterfactual, given
        the image's parents (factual or counterfactual) as Reg-CFT gives them."""
        if self.regressor is None or self.regressor_check is None:
            return
        pa = b["parents"].float()
        pred = self.regressor(b["image"], pa)["loc"].float()
        cal = self.calibrated
        pred_cal = cal(b["image"], pa)["loc"].float() if cal is not None else None
        self.regressor_check.factual(pred, pa)
        for iv in shared:
            if iv.true_image is not None:
                j = iv.index
                d_pred = self.regressor(iv.true_image, iv.pa_cf)["loc"].float()[:, j] - pred[:, j]
                d_cal = None
                if cal is not None and pred_cal is not None:
                    d_cal = cal(iv.true_image, iv.pa_cf)["loc"].float()[:, j] - pred_cal[:, j]
                self.regressor_check.counterfactual(iv.var.name, d_pred, iv.pa_cf[:, j] - pa[:, j], d_cal)

    def _parents_counterfactuals(self) -> dict[str, torch.Tensor]:
        """Counterfactual parents of every intervention on the whole split, shared by all modes."""
        pa_all = self.data["parents"].float()
        dscm = next(iter(self.dscms.values()))
        out: dict[str, torch.Tensor] = {}
        for j, var in enumerate(self.info.variables):
            targets = pa_all[permutation(self.count, self.seed + 7919 * (j + 1)), j]
            pa = pa_all.to(self.device)
            out[var.name] = dscm.parents_counterfactual(pa, {var.name: targets.to(self.device)}).cpu()
        return out

    def _floor(self, b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Measurement floor: segmentors on the factual images against the recorded values;
        returns the factual areas per segmentor."""
        info = self.info
        phys = info.denormalise(b["parents"].double())
        factual_areas = {}
        for who, seg in self.segmentors:
            areas = factual_areas[who] = self.meas(seg(b["image"]), b.get("regions"))
            for var in info.structure_variables:
                j = info.index(var.name)
                ae, ape = abs_errors(areas[:, j], phys[:, j], info.voxel_size)
                self.scores.add(Floor(var.name, who, "ae"), ae)
                self.scores.add(Floor(var.name, who, "ape"), ape)
        return factual_areas

    def _intervention(self, b: Mapping[str, torch.Tensor], var: Variable, pa_cf: torch.Tensor) -> _Intervention:
        """Everything about one intervention on one batch that does not depend on the generator."""
        info, meas = self.info, self.meas
        phys_cf = info.denormalise(pa_cf.double())
        regions = b.get("regions")
        fact_mask = meas.structure_mask(var, b["mask"], regions) if var.is_structure else None
        true_image = true_mask = None
        if self.phantom:
            image, mask, t_regions = self.dataset.render(b["exogenous"].cpu(), phys_cf.float().cpu())
            device = b["image"].device
            true_image = image.to(device).float()
            if var.is_structure:
                t_regions = t_regions.to(device).long() if t_regions is not None else regions
                true_mask = meas.structure_mask(var, mask.to(device).long(), t_regions)
        return _Intervention(info.index(var.name), var, pa_cf, phys_cf, fact_mask, true_image, true_mask)

    def _references(
        self, iv: _Intervention, factual_areas: Mapping[str, torch.Tensor], regions: torch.Tensor | None
    ) -> None:
        """Effectiveness and leakage of two reference images for one structure intervention: the
        factual image left unchanged (what a generator that ignores the parent scores) and, on
        phantoms, the exact counterfactual (the best any generator can score with these
        segmentors). They bracket every mode's figures; recorded as sources ``ref:<name>``."""
        for who, seg in self.segmentors:
            self.score_areas("ref:unchanged", who, factual_areas[who], iv)
            if iv.true_image is not None:
                self.score_areas("ref:exact", who, self.meas(seg(iv.true_image), regions), iv)

    def score_areas(self, source: str, who: str, areas: torch.Tensor, iv: _Intervention) -> None:
        """Errors of measured areas against the intervention's counterfactual values: every
        structure variable, and the mean over the non-intervened ones (leakage)."""
        info, name = self.info, iv.var.name
        leak = []
        for s in info.structure_variables:
            js = info.index(s.name)
            ae, ape = abs_errors(areas[:, js], iv.phys_cf[:, js], info.voxel_size)
            self.scores.add(AreaError(name, source, who, s.name, "ae"), ae)
            self.scores.add(AreaError(name, source, who, s.name, "ape"), ape)
            if s.name != name:
                leak.append(ape)
        if leak:
            self.scores.add(Leakage(name, source, who), _nanmean_rows(torch.stack(leak, dim=1)))


class _ModeScorer:
    """Every per-sample metric of one mode's DSCM on one batch: composition, then
    effectiveness, leakage, locality, ground truth and reversibility of every intervention.

    x is abducted once; the counterfactual of every intervention and the first null
    intervention reuse its latents and pixel noise (docs/method.md section 3.3)."""

    def __init__(self, ev: _Evaluation, mode: str, dscm: DSCM, b: Mapping[str, torch.Tensor], start: int) -> None:
        self.ev, self.mode, self.dscm, self.start = ev, mode, dscm, start
        self.x, self.pa, self.regions = b["image"], b["parents"].float(), b.get("regions")

    def run(self, interventions: list[_Intervention], fig_store: dict[str, dict[str, Any]] | None) -> None:
        ev, x, pa = self.ev, self.x, self.pa
        _seed_all(ev.seed, self.start, 0)
        factual = self.dscm.abduct(x, pa, ev.particles)
        x_m = factual.null()
        ev.scores.add(Composition(self.mode, 1), to_255(masked_mean_abs(x_m, x)))
        # further cycles on the subjects among the first evaluate.composition_n; under() draws
        # nothing, so what follows does not depend on how many cycles ran
        k = max(0, min(x.shape[0], ev.composition_n - self.start))
        if k > 0:
            _seed_all(ev.seed, self.start, 1)
            x_m, x_k, pa_k = x_m[:k], x[:k], pa[:k]
            for cycle in range(2, max(COMPOSITION_CYCLES) + 1):
                x_m = self.dscm.abduct(x_m, pa_k, ev.particles).null()
                if cycle in COMPOSITION_CYCLES:
                    ev.scores.add(Composition(self.mode, cycle), to_255(masked_mean_abs(x_m, x_k)))
        for iv in interventions:
            x_cf = factual.under(iv.pa_cf)
            cf_labels = self._areas(iv, x_cf)
            self._locality(iv, x_cf, cf_labels)
            _seed_all(ev.seed, self.start, 10_000 + iv.index)
            x_back = self.dscm.abduct(x_cf, iv.pa_cf, ev.particles).under(pa)
            ev.scores.add(Reversibility(iv.var.name, self.mode), to_255(masked_mean_abs(x_back, x)))
            if fig_store is not None and iv.fact_mask is not None:
                store = fig_store.setdefault(iv.var.name, {"x": x[0].cpu().numpy(), "cf": {}, "seg": {}})
                store["mask"] = iv.fact_mask[0].cpu().numpy()
                store["cf"][self.mode] = x_cf[0].cpu().numpy()
                if cf_labels is not None:
                    store["seg"][self.mode] = cf_labels[0].cpu().numpy()

    def _areas(self, iv: _Intervention, x_cf: torch.Tensor) -> torch.Tensor | None:
        """Effectiveness and leakage by every segmentor, and the error against the exact
        counterfactual; returns the evaluation segmentor's labels of x_cf."""
        ev, cf_labels = self.ev, None
        for who, seg in ev.segmentors:
            logits = seg(x_cf)
            if who == "eval":
                cf_labels = logits.argmax(dim=1)
            ev.score_areas(self.mode, who, ev.meas(logits, self.regions), iv)
        if iv.true_image is not None:
            ev.scores.add(ExactError(iv.var.name, self.mode, "all"), to_255(masked_mean_abs(x_cf, iv.true_image)))
        return cf_labels

    def _locality(self, iv: _Intervention, x_cf: torch.Tensor, cf_labels: torch.Tensor | None) -> None:
        """Change outside and inside the union of the factual and counterfactual structure
        masks (dilated), and outside the variable's region."""
        if iv.fact_mask is None:
            return
        ev, var, x, regions = self.ev, iv.var, self.x, self.regions
        name, mode = var.name, self.mode
        cf_mask = iv.true_mask if iv.true_mask is not None else ev.meas.structure_mask(var, cf_labels, regions)  # type: ignore[arg-type]
        union = iv.fact_mask | cf_mask
        loc = locality(x, x_cf, union, ev.dilation)
        ev.scores.add(Change(name, mode, "outside"), to_255(loc["outside"]))
        ev.scores.add(Change(name, mode, "inside"), to_255(loc["inside"]))
        if iv.true_image is not None:
            outside = ~dilate(union, ev.dilation)
            ev.scores.add(ExactError(name, mode, "outside"), to_255(masked_mean_abs(x_cf, iv.true_image, outside)))
        region_name = var.measure.region if var.measure is not None else None
        if region_name is not None and regions is not None:
            region = dilate(regions.eq(ev.info.region_id(region_name)), ev.dilation)
            ev.scores.add(Change(name, mode, "outside_region"), to_255(masked_mean_abs(x_cf, x, ~region)))


def _nanmean_rows(a: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(a)
    s = torch.where(finite, a, torch.zeros_like(a)).sum(1)
    c = finite.sum(1)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, math.nan))


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
