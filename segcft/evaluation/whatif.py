"""Single-image what-ifs (``segcft counterfactual``): abduct one image (a TIFF file or a dataset
sample), intervene on its variables, let descendants follow through the mechanisms and write
the run's ``DSCM`` counterfactual in the input's dtype, intensity range and spacing."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcft.data.imageio import read_tiff, write_tiff
from segcft.data.variables import DatasetInfo
from segcft.dscm import DSCM
from segcft.errors import UserError
from segcft.evaluation.measure import Measurer, measure_words

__all__ = ["MODE_PREFERENCE", "ParsedIntervention", "counterfactual", "counterfactual_with", "parse_intervention"]

MODE_PREFERENCE: tuple[str, ...] = ("pos-seg", "seg", "reg", "none")
"""Generator used by ``counterfactual`` when no mode is named: the first the run has."""


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
    mode = _pick_mode(run, mode)
    dscm = DSCM(info, run.mechanisms, run.generators[mode])
    eval_seg = run.eval_segmentor if run.eval_segmentor is not None else run.segmentor
    for module in (dscm.generator, run.segmentor, eval_seg, run.mechanisms, run.regressor):
        if module is not None:
            module.to(device).eval()
    src = _read_input(run, input)
    x = src.image.to(device)
    regions = None if src.regions is None else src.regions.to(device)
    meas = Measurer(info)
    notes = list(src.notes)
    what = f"--do {', '.join(interventions)}"
    with torch.no_grad():
        pa, phys, targets, pa_cf = _parents(run, dscm, src, x, regions, meas, parsed, what, notes)
        intended = info.denormalise(pa_cf.double())[0]
        torch.manual_seed(int(run.config.seed))
        x_cf, var_map = dscm.image_counterfactual(x, pa, pa_cf, particles=int(particles))
        if not bool(torch.isfinite(x_cf).all()):
            raise UserError(
                f"{what}: the {mode!r} generator's counterfactual image has NaN or infinite pixels (nothing written)"
            )
        before = meas(eval_seg(x), regions, src.spacing)[0] if eval_seg is not None else None
        after = meas(eval_seg(x_cf), regions, src.spacing)[0] if eval_seg is not None else None

    out = Path(out)
    write_tiff(out, src.from_unit(x_cf[0, 0].cpu().numpy()), src.spacing)
    std_path = std = None
    if var_map is not None and int(particles) > 1:
        std = var_map[0, 0].clamp_min(0).sqrt().cpu().numpy()
        std_path = out.with_name(out.stem + "_std" + (out.suffix or ".tif"))
        write_tiff(std_path, (std * src.half_range).astype(np.float32), src.spacing)
    if png is not None:
        from segcft.figures import counterfactual_png

        focus = None
        changed = [v for v in info.structure_variables if v.name in targets]
        if after is not None and changed:
            focus = meas.structure_mask(changed[0], eval_seg(x_cf).argmax(1), regions)[0].cpu().numpy()
        title = ", ".join(interventions) + f" ({mode})"
        counterfactual_png(
            x[0, 0].cpu().numpy(), x_cf[0, 0].cpu().numpy(), png, std=std, title=title, focus=focus, spacing=src.spacing
        )

    result = {
        "input": str(input),
        "output": str(out),
        "png": None if png is None else str(png),
        "uncertainty": None if std_path is None else str(std_path),
        "mode": mode,
        "abducted": src.parents is None,
        "spacing": list(src.spacing),
        "dtype": str(src.dtype),
        "variables": _rows(info, targets, phys, intended, before, after),
    }
    for line in _what_if_lines(result, notes, src):
        echo(line)
    return result


def _parents(
    run: Any,
    dscm: DSCM,
    src: _Input,
    x: torch.Tensor,
    regions: torch.Tensor | None,
    meas: Measurer,
    parsed: list[ParsedIntervention],
    what: str,
    notes: list[str],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(normalised parents (1, P), their physical values (P,), normalised targets, counterfactual
    parents (1, P)): recorded or abducted parents, then the mechanisms' counterfactual."""
    info: DatasetInfo = run.info
    if src.parents is None:
        pa = _abduct_parents(run, x, regions, src.spacing, meas)
        notes.append(
            f"parents abducted: structure variables measured by the guide segmentor "
            f"(soft {measure_words(info.spatial_dims)[0]}), subject variables predicted by the regressor"
        )
    else:
        pa = src.parents.to(x.device).float().reshape(1, -1)
    phys = info.denormalise(pa.double())[0]
    targets = _targets(parsed, info, phys, pa.dtype, x.device)
    pa_cf = dscm.parents_counterfactual(pa, targets)
    bad = [name for name, ok in zip(info.variable_names, torch.isfinite(pa_cf).all(0).tolist()) if not ok]
    if bad:
        raise UserError(
            f"{what}: the counterfactual value of {', '.join(bad)} is not finite; "
            "the intervention is out of the range the mechanisms can handle (nothing written)"
        )
    return pa, phys, targets, pa_cf


def _pick_mode(run: Any, mode: str | None) -> str:
    """The named mode, or the first of ``MODE_PREFERENCE`` the run has."""
    if mode is None:
        mode = next((m for m in MODE_PREFERENCE if m in run.generators), next(iter(run.generators), None))
    if mode is None or mode not in run.generators:
        raise UserError(f"--mode: the run has no {mode!r} generator; available: {', '.join(run.generators)}")
    return mode


def _targets(
    parsed: list[ParsedIntervention], info: DatasetInfo, phys: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Normalised (1,) target of every intervention from the subject's physical values ``phys``."""
    targets: dict[str, torch.Tensor] = {}
    for p in parsed:
        j = info.index(p.variable)
        value = p.apply(float(phys[j]))
        var = info.variables[j]
        if var.is_structure and value < 0:
            raise UserError(f"--do {p.variable}: the intended value {value:g} {var.unit} is negative")
        mean, std = info.normalisation.mean[j], info.normalisation.std[j]
        targets[p.variable] = torch.tensor([(value - mean) / std], dtype=dtype, device=device)
        if not (math.isfinite(value) and bool(torch.isfinite(targets[p.variable]).all())):
            raise UserError(
                f"--do {p.variable}: the intended value {value:g} {var.unit} is out of the model's range "
                f"(not finite once normalised)"
            )
    return targets


def _rows(
    info: DatasetInfo,
    targets: Mapping[str, torch.Tensor],
    phys: torch.Tensor,
    intended: torch.Tensor,
    before: torch.Tensor | None,
    after: torch.Tensor | None,
) -> dict[str, dict[str, Any]]:
    """Per variable: recorded or abducted value, intended value, and the measured areas."""
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
    return rows


def _what_if_lines(result: Mapping[str, Any], notes: list[str], src: _Input) -> list[str]:
    spacing = " x ".join(f"{s:g}" for s in result["spacing"])
    lines = [f"input {result['input']}: shape {tuple(src.image.shape[2:])}, {result['dtype']}, spacing {spacing} mm"]
    lines += notes
    word = measure_words(len(result["spacing"]))[0]
    lines.append(f"generator: {result['mode']}; measured by the evaluation segmentor (soft {word})")
    header = (
        f"{'variable':<24} {'unit':<6} {'before':>12} {'intended':>12} {'measured before':>16} {'measured after':>15}"
    )
    lines.append(header)

    def num(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}"

    for name, r in result["variables"].items():
        mark = "*" if r["intervened"] else " "
        lines.append(
            f"{mark}{name:<23} {r['unit']:<6} {num(r['before']):>12} {num(r['intended']):>12} "
            f"{num(r['measured_before']):>16} {num(r['measured_after']):>15}"
        )
    lines.append(
        f"wrote {result['output']}"
        + (f", {result['uncertainty']}" if result["uncertainty"] else "")
        + (f", {result['png']}" if result["png"] else "")
    )
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
            return (v >= 0.5 * (self.lo + self.hi)).astype(self.dtype)
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
    try:
        array, spacing = read_tiff(path)
    except UserError as e:
        raise UserError(f"--input {e}") from None
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
            f"{measure_words(info.spatial_dims)[0]} use the input's spacing"
        )
    regional = [v.name for v in info.structure_variables if v.measure is not None and v.measure.region]
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
    run: Any, x: torch.Tensor, regions: torch.Tensor | None, spacing: tuple[float, ...], meas: Measurer
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
