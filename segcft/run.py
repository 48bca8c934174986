"""Run folders: :class:`RunDir` spells their paths, tells which stages are complete and writes
their files atomically (``segcft train``); a finished (or partly finished) run is loaded for
inference through :func:`load_run` (``segcft evaluate``, ``segcft counterfactual``, library users)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from segcft.checkpoint import atomic_write_text, load_checkpoint, load_model_state, save_checkpoint, write_json
from segcft.components import build_component, build_dataset
from segcft.config import component_section
from segcft.data.variables import DatasetInfo, read_dataset_info
from segcft.distributed import Dist, resolve_device
from segcft.dscm import DSCM
from segcft.errors import UserError

if TYPE_CHECKING:
    from segcft.config import RunConfig

__all__ = ["Run", "RunDir", "generator_state", "guide_from", "guide_stages", "load_run"]


def guide_stages(cfg: Any) -> list[str]:
    """The stages that train the guide: ``segmentor`` and, with ``train.segmentor.guides`` = K > 1,
    ``segmentor-2`` ... ``segmentor-K`` (an ensemble); none without a segmentor plugin."""
    if not cfg.segmentor.name:
        return []
    return ["segmentor", *(f"segmentor-{k}" for k in range(2, cfg.train.segmentor.guides + 1))]


def guide_from(members: list[nn.Module]) -> nn.Module:
    """The guide of a run from its trained members: the one segmentor, or their ensemble (frozen)."""
    if len(members) == 1:
        return members[0]
    from segcft.models.ensemble import SegmentorEnsemble

    return SegmentorEnsemble(members).eval().requires_grad_(False)


class RunDir:
    """Every path of a run folder, spelled once (docs/design.md, "Run directory").

    ``config.yaml`` (the resolved config), ``dataset.json`` (dataset metadata and
    normalisation), ``checkpoints/<stage>.pt`` (a finished stage) and
    ``checkpoints/<stage>.last.pt`` (its resume state while it runs), ``gates.json`` (the
    segmentors' quality per structure), ``metrics.csv`` (+ ``tensorboard/``), ``metrics.json``,
    ``report.md`` and ``figures/``. It also decides when a
    stage is complete, forgets a stage to redo it, and writes the run's files atomically (one
    process: under DDP the caller lets rank 0 write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def final(self, stage: str) -> Path:
        """The checkpoint of a finished stage."""
        return self.checkpoints / f"{stage}.pt"

    def last(self, stage: str) -> Path:
        """The resume state of a stage that is running or was interrupted."""
        return self.checkpoints / f"{stage}.last.pt"

    def retry(self, stage: str) -> str:
        """The name under which a segmentor stage trains its gate retry (checkpoints, metrics)."""
        return f"{stage}-retry"

    @property
    def gates(self) -> Path:
        return self.root / "gates.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def is_run(self) -> bool:
        """Whether the folder holds a run (its resolved config)."""
        return self.config.is_file()

    # ---- stage completion and invalidation ----
    def done(self, stage: str) -> bool:
        """Whether ``stage`` is complete: its final checkpoint exists (for ``evaluate``: both
        ``report.md`` and ``metrics.json``)."""
        if stage == "evaluate":
            return self.report.is_file() and self.metrics_json.is_file()
        return self.final(stage).is_file()

    def invalidate(self, stage: str, keep_last: bool = False) -> None:
        """Forget a stage's results so that it runs again: its final checkpoint, its resume
        state unless ``keep_last`` (a resumed redo continues where it stopped), and for
        ``evaluate`` the report and metrics.json."""
        doomed = [self.final(stage)] + ([] if keep_last else [self.last(stage), self.last(self.retry(stage))])
        if stage == "evaluate":
            doomed += [self.report, self.metrics_json]
        for path in doomed:
            if path.is_file():
                path.unlink()

    # ---- atomic writes ----
    def save_final(self, stage: str, state: dict[str, Any]) -> None:
        """Mark ``stage`` complete: write its final checkpoint (``stage`` recorded in it), then
        drop its resume states (its own and its gate retry's)."""
        save_checkpoint(self.final(stage), {"stage": stage, **state})
        for last in (self.last(stage), self.last(self.retry(stage))):
            if last.is_file():
                last.unlink()

    def save_last(self, stage: str, state: dict[str, Any]) -> None:
        """Write the resume state of a running stage."""
        save_checkpoint(self.last(stage), state)

    def write_config(self, cfg: RunConfig) -> None:
        """Store the resolved config (refused before writing when it would not read back equal)."""
        from segcft.config import dump_run_config

        dump_run_config(cfg, self.config)

    def read_config(self, where: str = "config") -> RunConfig:
        """The stored resolved config as a ``RunConfig`` (``where`` names it in errors)."""
        from segcft.config import read_yaml, run_config_from_dict

        return run_config_from_dict(read_yaml(self.config), where)

    def write_dataset_info(self, info: DatasetInfo) -> None:
        """Store the dataset metadata and normalisation."""
        write_json(self.dataset_json, info.to_dict())

    def write_results(self, metrics: dict[str, Any], report: str) -> None:
        """The evaluation's metrics.json, then report.md (their pair marks ``evaluate`` complete)."""
        write_json(self.metrics_json, metrics)
        atomic_write_text(self.report, report)

    def write_gate(self, stage: str, record: dict[str, Any]) -> None:
        """Store one segmentor stage's quality gate record in ``gates.json`` (the other stages'
        records kept)."""
        with _file_lock(self.root / ".gates.lock"):  # the two segmentor stages may train side by side
            gates = self.read_gates()
            gates[stage] = record
            write_json(self.gates, gates)

    def read_gates(self) -> dict[str, Any]:
        """``gates.json``: quality gate records per segmentor stage; empty when there is none."""
        if not self.gates.is_file():
            return {}
        try:
            gates: dict[str, Any] = json.loads(self.gates.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.gates}: cannot be read as JSON ({e})") from None
        return gates if isinstance(gates, dict) else {}

    def figure(self, name: str) -> Path:
        """A figure of the run, ``figures/<name>.png``."""
        return self.figures / f"{name}.png"

    def read_metrics(self) -> dict[str, Any]:
        """The evaluation's metrics.json."""
        result: dict[str, Any] = json.loads(self.metrics_json.read_text())
        return result


@dataclass
class Run:
    """A run folder loaded for inference: every trained component, in eval mode, frozen."""

    run_dir: Path
    config: Any
    info: DatasetInfo
    device: torch.device
    mechanisms: nn.Module
    segmentor: nn.Module | None
    eval_segmentor: nn.Module | None
    regressor: nn.Module | None
    generators: dict[str, nn.Module]
    eps: float
    regressor_calibration: dict[str, torch.Tensor] | None = None  # its stage's fit (models.calibration)
    _datasets: dict[str, Any] = field(default_factory=dict, repr=False)

    def dataset(self, split: str) -> Any:
        """The run's dataset for ``split`` (train, val or test), built once."""
        if split not in ("train", "val", "test"):
            raise UserError(f"split: expected train, val or test, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = build_dataset(self.config, split)
        return self._datasets[split]

    def dscm(self, mode: str = "none") -> DSCM:
        """The DSCM whose image mechanism is the generator fine-tuned in ``mode``."""
        if mode not in self.generators:
            raise UserError(f"mode {mode!r} was not trained in {self.run_dir}; available: {sorted(self.generators)}")
        return DSCM(self.info, self.mechanisms, self.generators[mode])


def load_run(run_dir: Path | str, device: str | None = None) -> Run:
    """Load a run folder written by :func:`run_training` (weights-only checkpoints)."""
    rd = RunDir(run_dir)
    run_dir = rd.root
    if not rd.is_run():
        raise UserError(f"{run_dir} is not a segcft run folder (no config.yaml)")
    cfg = rd.read_config()
    info = read_dataset_info(rd.dataset_json)
    dev = resolve_device(device or cfg.device, Dist())

    def frozen(module: nn.Module, path: Path, what: str, state: dict[str, Any] | None = None) -> nn.Module:
        load_model_state(module, load_checkpoint(path) if state is None else state, path, what)
        return module.to(dev).eval().requires_grad_(False)

    def optional(kind: str, stage: str) -> nn.Module | None:
        section = component_section(cfg, kind, stage)
        if not section.name or not rd.final(stage).is_file():
            return None
        return frozen(build_component(kind, section, info), rd.final(stage), f"{kind} {section.name!r}")

    members = [optional("segmentor", stage) for stage in guide_stages(cfg)]
    loaded = [m for m in members if m is not None]
    guide = guide_from(loaded) if loaded and len(loaded) == len(members) else None

    from segcft.models.mechanisms import ParentSCM

    mechanisms = frozen(ParentSCM(info, cfg.mechanisms), rd.final("mechanisms"), "parent mechanisms")
    gen_what = f"generator {cfg.generator.name!r}"
    gen_state = generator_state(rd.final("generator"))
    generators = {
        "none": frozen(build_component("generator", cfg.generator, info), rd.final("generator"), gen_what, gen_state)
    }
    for mode in cfg.cft.modes:
        path = rd.final(f"cft-{mode}")
        if mode != "none" and path.is_file():
            generators[mode] = frozen(build_component("generator", cfg.generator, info), path, gen_what)
    return Run(
        run_dir=run_dir,
        config=cfg,
        info=info,
        device=dev,
        mechanisms=mechanisms,
        segmentor=guide,
        eval_segmentor=optional("segmentor", "eval_segmentor"),
        regressor=optional("regressor", "regressor"),
        generators=generators,
        eps=float(gen_state["eps"]),
        regressor_calibration=_calibration(rd.final("regressor"), info) if cfg.regressor.name else None,
    )


def _calibration(path: Path, info: DatasetInfo) -> dict[str, torch.Tensor] | None:
    """The calibration a regressor checkpoint stores; None when there is no checkpoint or it
    predates calibrations."""
    return stored_calibration(load_checkpoint(path), info, path) if path.is_file() else None


def stored_calibration(state: dict[str, Any], info: DatasetInfo, path: Path) -> dict[str, torch.Tensor] | None:
    """The calibration in a regressor checkpoint's ``state`` (None when it predates
    calibrations); one that does not fit the run's variables is a UserError naming ``path``."""
    from segcft.models.calibration import calibration_problem

    calibration = state.get("calibration")
    if calibration is None:
        return None
    problem = calibration_problem(calibration, len(info.variables))
    if problem is not None:
        raise UserError(f"{path}: {problem}; retrain the regressor with --only regressor")
    return dict(calibration)


def regressor_reader(module: nn.Module, state: dict[str, Any], cfg: Any, info: DatasetInfo, path: Path) -> nn.Module:
    """The regressor as the fine-tuning objectives read it: through the calibration its stage
    stored (segcft.models.calibration) when ``cft.calibrate_regressor`` is on, else as trained;
    on, a checkpoint without one is an error that says what to do."""
    if not cfg.cft.calibrate_regressor:
        return module
    from segcft.models.calibration import CalibratedRegressor

    calibration = stored_calibration(state, info, path)
    if calibration is None:
        raise UserError(
            f"{path} has no calibration (a regressor trained before segcft calibrated them): "
            "retrain it with --only regressor, or read it as trained with --set cft.calibrate_regressor=false"
        )
    return CalibratedRegressor(module, calibration, info)


def generator_state(path: Path) -> dict[str, Any]:
    """A final generator checkpoint, which records eps beside the weights."""
    state = load_checkpoint(path)
    if not isinstance(state.get("eps"), (int, float)):
        raise UserError(f"checkpoint {path} records no eps (not a trained generator's final checkpoint)")
    return state


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created when missing) for a read-modify-write of
    a file that several processes of one run update; no lock where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: stages then never train side by side (segcft.train.lanes)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
