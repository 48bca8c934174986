"""Checks that the numbers of an evaluation rest on models that have learned (docs/method.md
section 6.6): the generator's responsiveness to its structure parents, the regressor's held-out
correlation and its slope on exact counterfactuals, and the marks on every number measured by a
segmentor whose error on factual images is large for that structure. Each check returns a plain
summary for metrics.json; ``sections`` writes them into report.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from segcft.data.variables import DatasetInfo
from segcft.evaluation.measure import Measurer
from segcft.models.calibration import MIN_ATTENUATION

__all__ = [
    "DAGGER",
    "QUANTILES",
    "SLOPE_WARN",
    "RegressorCheck",
    "floor_footnotes",
    "floor_marks",
    "mark",
    "responsiveness",
    "sections",
    "warnings",
]

QUANTILES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Intervened values of the responsiveness check: these quantiles of the evaluated split's values."""

SLOPE_WARN = 0.5
"""A generator whose abducted counterfactuals follow an intervened area with a slope under this
(measured by the guide) barely responds to that parent: a warning."""

DAGGER = "†"

_STAGE_OF = {"eval": "eval_segmentor", "guide": "segmentor"}


# -- generator responsiveness ---------------------------------------------------------------------
def responsiveness(
    info: DatasetInfo,
    dscms: Mapping[str, Any],
    seg: Any,
    data: Mapping[str, torch.Tensor],
    split_parents: torch.Tensor,
    seed: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Per mode and structure variable, the within-subject slope of the area measured by ``seg``
    (the guide) against the intervened area, over the ``QUANTILES`` of the split's values, for
    (i) ``prior_mean`` decodes (``generator.sample(pa, temperature=0)``: z at its prior mean, the
    parents of each subject of the batch ``data`` with the structure set), (ii) ``abducted``
    counterfactuals of those subjects and (iii) ``abducted_mean``, their decoder mean mu* alone
    (without the pixel noise u abducted from the factual image: where it is well above (ii), u
    keeps the factual outline); ``split_parents`` (N, P) gives the quantiles. 1 follows
    the parent exactly, 0 ignores it; None where a slope is undefined (no ``sample``). Subjects
    go through the models ``batch_size`` at a time (all at once when None), so that the check
    needs no more memory than the evaluation's own batches."""
    meas, out = Measurer(info), {}
    device = next(iter(data.values())).device if data else torch.device("cpu")
    n = int(data["image"].shape[0])
    step = n if not batch_size else max(1, int(batch_size))
    chunks = [{k: v[s : s + step] for k, v in data.items()} for s in range(0, n, step)]
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    values = {
        var.name: torch.quantile(split_parents[:, info.index(var.name)].double().cpu(), q).float().to(device)
        for var in info.structure_variables
    }
    for mode, dscm in dscms.items():
        sample = getattr(dscm.generator, "sample", None)
        rows: dict[str, dict[str, list[torch.Tensor]]] = {
            var.name: {"t": [], "abducted": [], "mean": [], "prior": []} for var in info.structure_variables
        }
        torch.manual_seed(int(seed) * 7 + 3)
        for chunk in chunks:
            x, pa = chunk["image"].float(), chunk["parents"].float()
            regions = chunk["regions"].long() if "regions" in chunk else None
            abduction = dscm.abduct(x, pa)
            for var in info.structure_variables:
                j, r = info.index(var.name), rows[var.name]
                pa_cf = [
                    dscm.parents_counterfactual(pa, {var.name: torch.full_like(pa[:, j], float(v))})
                    for v in values[var.name]
                ]
                r["t"].append(torch.stack([info.denormalise(p.double())[:, j] for p in pa_cf], 1))
                measured = []  # (counterfactual, decoder mean) per value, one decode each, measured at once
                for p in pa_cf:
                    x_cf, mu = abduction.under_with_mean(p)
                    measured.append((meas(seg(x_cf), regions)[:, j], meas(seg(mu), regions)[:, j]))
                r["abducted"].append(torch.stack([a for a, _ in measured], 1))
                r["mean"].append(torch.stack([m for _, m in measured], 1))
                if callable(sample):
                    prior = [meas(seg(sample(p, temperature=0.0)), regions)[:, j] for p in pa_cf]
                    r["prior"].append(torch.stack(prior, 1))
        entry = {}
        for var in info.structure_variables:
            r = rows[var.name]
            t = torch.cat(r["t"])
            entry[var.name] = {
                "abducted": _slope(t, torch.cat(r["abducted"])),
                "abducted_mean": _slope(t, torch.cat(r["mean"])),
                "prior_mean": _slope(t, torch.cat(r["prior"])) if r["prior"] else None,
                "images": n,
                "values": [float(a) for a in t.mean(0)],
            }
        out[mode] = entry
    return out


def _slope(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Within-subject least-squares slope of (n, V) ``y`` on ``x`` (rows demeaned)."""
    dx = x.double() - x.double().mean(1, keepdim=True)
    dy = y.double() - y.double().mean(1, keepdim=True)
    keep = torch.isfinite(dy).all(1)
    den = float((dx[keep] ** 2).sum())
    return float((dx[keep] * dy[keep]).sum()) / den if den > 0 else None


# -- regressor ------------------------------------------------------------------------------------
class RegressorCheck:
    """The regressor's predictions (``loc``, normalised units) on factual images against the
    recorded parents, and on exact counterfactuals against the intervened values; with a
    calibration (``calibration``: its per-variable summary) also the calibrated reading's slope
    and the attenuation. ``reg_cft_reads`` says which of the two Reg-CFT acted on."""

    def __init__(
        self, info: DatasetInfo, calibration: Mapping[str, Any] | None = None, reg_cft_reads: str = "raw"
    ) -> None:
        self.info = info
        self.calibration = dict(calibration or {})
        self.reg_cft_reads = reg_cft_reads
        self.pred: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []
        self.exact: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.exact_calibrated: dict[str, list[torch.Tensor]] = {}

    def factual(self, pred: torch.Tensor, pa: torch.Tensor) -> None:
        self.pred.append(pred.double().cpu())
        self.true.append(pa.double().cpu())

    def counterfactual(
        self, name: str, d_pred: torch.Tensor, d_value: torch.Tensor, d_calibrated: torch.Tensor | None = None
    ) -> None:
        """Changes of the prediction for ``name`` (``d_calibrated``: of the calibrated reading)
        between the factual image and its exact counterfactual, against the changes of the
        intervened value."""
        dx, dy = self.exact.setdefault(name, ([], []))
        dx.append(d_value.double().cpu())
        dy.append(d_pred.double().cpu())
        if d_calibrated is not None:
            self.exact_calibrated.setdefault(name, []).append(d_calibrated.double().cpu())

    def summary(self, split: str) -> dict[str, Any]:
        pred, true = torch.cat(self.pred), torch.cat(self.true)
        out: dict[str, Any] = {"split": split, "n": int(pred.shape[0]), "variables": {}}
        for j, var in enumerate(self.info.variables):
            entry: dict[str, Any] = {"correlation": _corr(pred[:, j], true[:, j])}
            if var.name in self.exact:
                dx, dy = (torch.cat(t) for t in self.exact[var.name])
                den = float((dx**2).sum())
                entry["exact_slope"] = float((dx * dy).sum()) / den if den > 0 else None
                if var.name in self.exact_calibrated:
                    dc = torch.cat(self.exact_calibrated[var.name])
                    entry["calibrated_exact_slope"] = float((dx * dc).sum()) / den if den > 0 else None
            if var.name in self.calibration:
                entry.update(self.calibration[var.name])
            out["variables"][var.name] = entry
        out["calibration"] = bool(self.calibration)
        out["reg_cft_reads"] = self.reg_cft_reads
        return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a**2).sum()) * float((b**2).sum()))
    return float((a * b).sum()) / den if den > 0 else None


# -- floor marks ----------------------------------------------------------------------------------
def floor_marks(result: Mapping[str, Any], gates: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    """The structures whose measuring segmentor (``eval``, ``guide``) has a floor above
    ``threshold`` %: the soft-area MAPE on factual validation images that the quality gate recorded
    (gates.json), else (and for a guide ensemble, whose members the gate measured one by one) the
    MAPE on the evaluated split's factual images (``factual``)."""
    marks: dict[str, Any] = {"threshold": threshold, "segmentors": {}}
    if threshold <= 0:
        return marks
    evaluated_by_guide = str(result.get("eval_segmentor", "")).startswith("guide")
    ensemble = int(result.get("guide_members") or 1) > 1  # the gate measured its members, not their mean
    for s, by_who in (result.get("factual") or {}).items():
        for who, errors in by_who.items():
            stage = "segmentor" if who == "guide" or evaluated_by_guide else _STAGE_OF[who]
            floor = None if ensemble and stage == "segmentor" else ((gates.get(stage) or {}).get("floors") or {}).get(s)
            source = "val"
            if not isinstance(floor, (int, float)):
                floor, source = ((errors or {}).get("mape") or {}).get("mean"), str(result.get("split"))
            if isinstance(floor, (int, float)) and math.isfinite(floor) and floor > threshold:
                marks["segmentors"].setdefault(who, {})[s] = {"floor": float(floor), "split": source}
    return marks


def mark(result: Mapping[str, Any], who: str, *structures: str) -> str:
    """A dagger when ``who`` has a floor over the threshold for any of ``structures``."""
    marked = ((result.get("floor_marks") or {}).get("segmentors") or {}).get(who) or {}
    return DAGGER if any(s in marked for s in structures) else ""


def floor_footnotes(result: Mapping[str, Any]) -> list[str]:
    """One line per marked (segmentor, structure)."""
    fm = result.get("floor_marks") or {}
    names = {"eval": "evaluation segmentor", "guide": "guide"}
    return [
        f"{DAGGER} {s} ({names.get(who, who)}): measured by a segmentor whose soft-area error on factual "
        f"{m['split']} images is {m['floor']:.1f} % for this structure (over {fm['threshold']:.1f} %)"
        for who, by_s in (fm.get("segmentors") or {}).items()
        for s, m in by_s.items()
    ]


# -- warnings and report sections -----------------------------------------------------------------
def warnings(result: Mapping[str, Any]) -> list[str]:
    """A line per (mode, structure) whose abducted counterfactuals barely follow the parent."""
    lines = []
    for mode, entry in (result.get("responsiveness") or {}).items():
        for name, e in entry.items():
            slope = e.get("abducted")
            if slope is not None and slope < SLOPE_WARN:
                mean = e.get("abducted_mean")
                lines.append(
                    f"generator {mode!r} barely responds to {name}: the guide measures a slope of {slope:.2f} "
                    f"(under {SLOPE_WARN}) of its area against the intervened one on abducted counterfactuals"
                    + (f" ({mean:.2f} on their decoder mean alone)" if mean is not None else "")
                )
    return lines


def sections(result: Mapping[str, Any]) -> list[str]:
    """report.md's responsiveness and regressor sections."""
    L: list[str] = []
    resp = result.get("responsiveness") or {}
    if resp:
        L += ["## Responsiveness", ""]
        L.append(
            "Within-subject slope of the area measured by the guide against the intervened area "
            f"(quantiles {', '.join(f'{q:g}' for q in QUANTILES)} of the split's values): prior-mean decodes "
            "(z at its prior mean), abducted counterfactuals, and their decoder mean alone (without the pixel "
            "noise abducted from the factual image; well above the abducted slope: that noise keeps the factual "
            "outline; well below it: the edit rides on the likelihood's scale, which rescales that noise). "
            "1: follows the parent; 0: ignores it."
        )
        L.append("")
        rows = [
            [
                mode,
                name,
                _num(e.get("prior_mean")),
                _num(e.get("abducted")),
                _num(e.get("abducted_mean")),
                str(e.get("images", "")),
            ]
            for mode, entry in resp.items()
            for name, e in entry.items()
        ]
        L += _table(
            ["mode", "structure", "slope (prior mean)", "slope (abducted)", "slope (abducted, decoder mean)", "images"],
            rows,
        )
        L.append("")
    reg = result.get("regressor")
    if reg:
        L += ["## Regressor", ""]
        L.append(
            f"Correlation of the regressor's prediction with the recorded value on the {reg['split']} split "
            f"({reg['n']} images), and the slope of its prediction's change against the intervened change on exact "
            "counterfactuals (phantoms; 1: follows the variable)."
        )
        L.append("")
        if reg.get("calibration"):
            reads = "the calibrated reading" if reg.get("reg_cft_reads") == "calibrated" else "the raw prediction"
            L.append(
                "Beside them, the calibrated reading's slope (the prediction minus what the variable's parents "
                "predict, divided by the attenuation) and the attenuation itself (the prediction's slope on the "
                "true value with the parents fixed, fitted on the validation split when the regressor was "
                f"trained; a variable under {MIN_ATTENUATION:g} stays uncalibrated). Reg-CFT acted on {reads} "
                "(cft.calibrate_regressor)."
            )
            L.append("")
            rows = [
                [
                    name,
                    _num(e.get("correlation")),
                    _num(e.get("exact_slope")),
                    _num(e.get("calibrated_exact_slope")) if e.get("calibrated") else "–",
                    _num(e.get("attenuation")),
                ]
                for name, e in reg["variables"].items()
            ]
            L += _table(
                ["variable", "correlation", "slope on exact counterfactuals", "calibrated slope", "attenuation"], rows
            )
        else:
            rows = [
                [name, _num(e.get("correlation")), _num(e.get("exact_slope"))] for name, e in reg["variables"].items()
            ]
            L += _table(["variable", "correlation", "slope on exact counterfactuals"], rows)
        L.append("")
    warn = result.get("warnings") or []
    if warn:
        L += ["## Warnings", ""] + [f"- {w}" for w in warn] + [""]
    return L


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]
