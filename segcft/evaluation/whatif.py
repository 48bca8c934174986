"""Single-image what-ifs (``segcft counterfactual``): abduct one image (a TIFF or NIfTI file, a
subject of the run's dataset or a sample), intervene on its variables, let descendants follow
through the mechanisms and write the run's ``DSCM`` counterfactual in the input's format,
geometry, units and dtype family (reading and writing: ``cf_io``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcft.data.variables import DatasetInfo
from segcft.dscm import DSCM
from segcft.errors import UserError
from segcft.evaluation.cf_io import FORMATS, Source, read_source, suffix_format
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
    diff: Path | str | None = None,
) -> dict[str, Any]:
    """Answer one what-if: abduct the input (a TIFF or NIfTI file, a subject id of the run's
    dataset, or a sample such as ``test:12``), apply the interventions, let descendants follow
    through the mechanisms, and write the counterfactual to ``out`` in the input's format,
    geometry, units and dtype family (``diff``: also counterfactual minus factual).

    ``mode`` picks the generator (default: the first of pos-seg, seg, reg, none the run has).
    Every argument is checked, and the input read, before any model is loaded. Prints the
    intended and measured values before and after through ``echo``."""
    from segcft.run import RunDir, load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not RunDir(run_dir).is_run():
        raise UserError(f"--run: {run_dir} is not a run folder")
    if not interventions:
        raise UserError("--do: give at least one intervention, e.g. --do left_lung_area=+20%")
    if int(particles) < 1:
        raise UserError(f"--particles: expected a positive integer, got {particles}")
    meta = _RunMeta(RunDir(run_dir))
    _parse_all(interventions, meta.info)
    src = read_source(meta, input)
    _check_outputs(src, out, diff)
    run = load_run(run_dir)
    return _answer(run, src, input, interventions, out, png, particles, mode, echo, diff)


class _RunMeta:
    """What reading an input needs of a run folder (config, dataset info, its dataset), without its models."""

    def __init__(self, rd: Any) -> None:
        from segcft.data.variables import read_dataset_info

        self.config = rd.read_config()
        self.info = read_dataset_info(rd.dataset_json)
        self._datasets: dict[str, Any] = {}

    def dataset(self, split: str) -> Any:
        from segcft.components import build_dataset

        if split not in self._datasets:
            self._datasets[split] = build_dataset(self.config, split)
        return self._datasets[split]


def _parse_all(interventions: list[str], info: DatasetInfo) -> list[ParsedIntervention]:
    """Every ``--do``, each variable at most once."""
    parsed = [parse_intervention(t, info) for t in interventions]
    seen: set[str] = set()
    for p in parsed:
        if p.variable in seen:
            raise UserError(f"--do: {p.variable!r} is given twice")
        seen.add(p.variable)
    return parsed


def _check_outputs(src: Source, out: Path | str, diff: Path | str | None) -> None:
    src.check_out(out, "--out")
    if diff is not None:
        src.check_out(diff, "--diff")
        if Path(diff).resolve() == Path(out).resolve():
            raise UserError(f"--diff {diff}: the same file as --out")


def counterfactual_with(
    run: Any,
    input: str | Path,
    interventions: list[str],
    out: Path | str,
    png: Path | str | None = None,
    particles: int = 1,
    mode: str | None = None,
    echo: Callable[[str], None] = print,
    diff: Path | str | None = None,
) -> dict[str, Any]:
    """``counterfactual`` on a loaded run (see there)."""
    _parse_all(interventions, run.info)
    _pick_mode(run, mode)
    src = read_source(run, input)
    _check_outputs(src, out, diff)
    return _answer(run, src, input, interventions, out, png, particles, mode, echo, diff)


def _answer(
    run: Any,
    src: Source,
    input: str | Path,
    interventions: list[str],
    out: Path | str,
    png: Path | str | None,
    particles: int,
    mode: str | None,
    echo: Callable[[str], None],
    diff: Path | str | None,
) -> dict[str, Any]:
    """The what-if of a read input on a loaded run: measure, intervene, generate, write."""
    info: DatasetInfo = run.info
    device = torch.device(run.device)
    parsed = _parse_all(interventions, info)
    mode = _pick_mode(run, mode)
    dscm = DSCM(info, run.mechanisms, run.generators[mode])
    eval_seg = run.eval_segmentor if run.eval_segmentor is not None else run.segmentor
    for module in (dscm.generator, run.segmentor, eval_seg, run.mechanisms, run.regressor):
        if module is not None:
            module.to(device).eval()
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
        seg_before = eval_seg(x) if eval_seg is not None else None
        seg_after = eval_seg(x_cf) if eval_seg is not None else None
        before = meas(seg_before, regions, src.spacing)[0] if seg_before is not None else None
        after = meas(seg_after, regions, src.spacing)[0] if seg_after is not None else None

    out = Path(out)
    x_np, cf_np = x[0, 0].cpu().numpy(), x_cf[0, 0].cpu().numpy()
    written = src.written(x_np, cf_np)
    src.save(out, written)
    if diff is not None:
        src.save(Path(diff), (written.astype(np.float64) - src.factual).astype(np.float32))
    std_path = std = None
    if var_map is not None and int(particles) > 1:
        std = var_map[0, 0].clamp_min(0).sqrt().cpu().numpy()
        std_path = _sibling(out, "_std")
        src.save(std_path, src.back(std.astype(np.float64) * src.half_range).astype(np.float32))
    section = None
    if png is not None:
        focus = _focus(info, targets, intended, phys, meas, seg_before, seg_after, regions)
        section = _png(png, src, x_np, cf_np, std, ", ".join(interventions) + f" ({mode})", focus)

    result = {
        "input": str(input),
        "output": str(out),
        "diff": None if diff is None else str(diff),
        "png": None if png is None else str(png),
        "section": section,
        "uncertainty": None if std_path is None else str(std_path),
        "mode": mode,
        "abducted": src.parents is None,
        "format": src.format,
        "spacing": list(src.spacing),
        "output_spacing": list(src.out_spacing),
        "dtype": str(src.dtype),
        "variables": _rows(info, targets, phys, intended, before, after),
    }
    for line in _what_if_lines(result, notes, src):
        echo(line)
    return result


def _sibling(path: Path, tag: str) -> Path:
    """``cf.nii.gz`` -> ``cf<tag>.nii.gz``: a file beside ``path`` with the same format suffix."""
    name = path.name
    fmt = suffix_format(path)
    sfx = next((s for s in FORMATS.get(fmt or "", ()) if name.lower().endswith(s)), path.suffix)
    return path.with_name(name[: len(name) - len(sfx)] + tag + (sfx or ".tif"))


def _focus(
    info: DatasetInfo,
    targets: Mapping[str, torch.Tensor],
    intended: torch.Tensor,
    phys: torch.Tensor,
    meas: Measurer,
    seg_before: torch.Tensor | None,
    seg_after: torch.Tensor | None,
    regions: torch.Tensor | None,
) -> tuple[str, list[np.ndarray]] | None:
    """The structure the figure follows (the first intervened structure variable, else the
    first one the intervention moves) and its masks in the factual and the counterfactual."""
    if seg_before is None or seg_after is None:
        return None
    moved = [v for v in info.structure_variables if v.name in targets]
    moved += [
        v for v in info.structure_variables if abs(float(intended[info.index(v.name)] - phys[info.index(v.name)])) > 0
    ]
    if not moved:
        return None
    var = moved[0]
    masks = [meas.structure_mask(var, s.argmax(1), regions)[0].cpu().numpy() for s in (seg_before, seg_after)]
    assert var.measure is not None
    return var.measure.structure, masks


def _png(
    png: Path | str,
    src: Source,
    x: np.ndarray,
    x_cf: np.ndarray,
    std: np.ndarray | None,
    title: str,
    focus: tuple[str, list[np.ndarray]] | None,
) -> int | None:
    """Factual, counterfactual and difference (in the input's units) through the structure;
    returns the index of the section shown in 3D."""
    from segcft.figures import counterfactual_png, focus_section

    structure, masks = focus if focus is not None else (None, [])
    counterfactual_png(
        x,
        x_cf,
        png,
        std=std,
        title=title,
        spacing=src.spacing,
        masks=masks,
        structure=structure,
        scale=src.half_range,
        unit="input units",
    )
    return focus_section(x, masks)


def _parents(
    run: Any,
    dscm: DSCM,
    src: Source,
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


def _what_if_lines(result: Mapping[str, Any], notes: list[str], src: Source) -> list[str]:
    spacing = " x ".join(f"{s:g}" for s in result["spacing"])
    lines = [
        f"input {result['input']} ({src.label}): {result['format']}, {result['dtype']}, {tuple(src.factual.shape)}; "
        f"on the run's grid {tuple(src.image.shape[2:])} at {spacing} mm"
    ]
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
        + (f", {result['diff']} (counterfactual - factual)" if result["diff"] else "")
        + (f", {result['uncertainty']}" if result["uncertainty"] else "")
        + (f", {result['png']}" if result["png"] else "")
        + (f" (section {result['section']})" if result["section"] is not None else "")
    )
    return lines


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
