"""``run_training``: check a run request, validate it before any training, then walk the stage
table (segcft/train/stages.py) in one resumable run folder (docs/design.md, "Run directory")."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component, build_dataset, registry_entry
from segcft.config import component_section
from segcft.distributed import init_distributed, resolve_device
from segcft.errors import ConfigError, UserError
from segcft.objectives.modes import check_mode, objective_needs
from segcft.protocols import GUIDES
from segcft.run import RunDir, guide_stages, regressor_reader
from segcft.train.context import StageContext, keep_freed_memory, set_cpu_threads
from segcft.train.lanes import Lane, lanes_possible, plan_waves, run_lanes
from segcft.train.progress import RunClock
from segcft.train.stages import EPS_SAMPLES, run_stage, stage_entry, stage_names

__all__ = ["run_training"]


# -- validation: one clear line before any training -------------------------------------------
def validate(ctx: StageContext, stages: list[str]) -> None:
    """Components, modes, dataset and the checkpoints that ``stages`` will read fit together."""
    cfg, info = ctx.cfg, ctx.info
    for kind in ("generator", "segmentor", "regressor"):
        section = getattr(cfg, kind)
        if kind == "generator" and not section.name:
            raise ConfigError("generator.name: a generator plugin is required (e.g. --generator NAME)")
        if not section.name:
            continue
        entry = registry_entry(kind, section)
        if info.spatial_dims not in entry.dims:
            dims = "/".join(f"{x}D" for x in entry.dims)
            raise ConfigError(
                f"{kind} {section.name!r} supports {dims} data only; "
                f"dataset {cfg.dataset.name!r} is {info.spatial_dims}D"
            )
        if kind != "segmentor":
            build_component(kind, section, info)  # parameter errors surface now, not mid-run
    for mode in cfg.cft.modes:
        check_mode(mode, info)
        for kind in objective_needs(mode):
            if kind in GUIDES and not getattr(cfg, kind).name:
                raise ConfigError(f"cft.modes: {mode!r} needs a {kind} ({kind}.name)")
    if ctx.segmentor_checkpoint is not None and "segmentor" in stages:
        ctx.segmentor_import = _read_segmentor_import(ctx, ctx.segmentor_checkpoint)
    if cfg.segmentor.name:
        must_train = [s for s in (*guide_stages(cfg), "eval_segmentor") if s in stages and not ctx.run.done(s)]
        if ctx.segmentor_checkpoint is not None and "segmentor" in must_train:
            must_train.remove("segmentor")
        if must_train and "mask" not in ctx.train_set[0]:
            raise ConfigError(
                f"dataset {cfg.dataset.name!r} has no masks, but the {must_train[0]} stage must train a "
                f"segmentor on them (use --segmentor-checkpoint, or a dataset with masks)"
            )
        _check_classes(ctx, build_component("segmentor", cfg.segmentor, info), cfg.segmentor.name)
        if cfg.eval_segmentor and "eval_segmentor" in must_train:
            try:  # its own parameters: a plugin's check of them fails now, not after the guide trained
                build_component("segmentor", component_section(cfg, "segmentor", "eval_segmentor"), info)
            except UserError as exc:
                raise ConfigError(f"eval_segmentor {dict(cfg.eval_segmentor)}: {exc}") from None
    _check_checkpoints(ctx, stages)


def _check_checkpoints(ctx: StageContext, stages: list[str]) -> None:
    """The checkpoints that ``stages`` will read (finished stages they require, their own resume
    states) fit this run's components: a wrong one is one line now, not after hours of training."""
    cfg, run = ctx.cfg, ctx.run
    uses = {s for stage in stages for s in stage_entry(cfg, stage).requires(cfg, stage)}
    paths = [(s, run.final(s)) for s in sorted(uses) if s not in stages and run.done(s)]
    paths += [(s, run.last(s)) for s in stages if ctx.resume and run.last(s).is_file()]
    for stage, path in paths:
        kind = "segmentor" if "segmentor" in stage else "generator" if stage.startswith("cft-") else stage
        module: nn.Module
        if kind == "mechanisms":
            from segcft.models.mechanisms import ParentSCM

            module, what = ParentSCM(ctx.info, cfg.mechanisms), "parent mechanisms"
        else:
            section = component_section(cfg, kind, stage)
            module, what = build_component(kind, section, ctx.info), f"{kind} {section.name!r}"
        state = load_checkpoint(path)
        load_model_state(module, state, path, what)
        if kind == "regressor" and path == run.final(stage):  # read by fine-tuning: its calibration too
            regressor_reader(module, state, cfg, ctx.info, path)


def _check_classes(ctx: StageContext, seg: nn.Module, what: str) -> None:
    """The segmentor's classes name every structure of the dataset at its class index."""
    classes = tuple(getattr(seg, "classes", ()))
    for v in ctx.info.structure_variables:
        assert v.measure is not None
        c = ctx.info.class_index(v.measure.structure)
        if c >= len(classes) or classes[c] != v.measure.structure:
            raise ConfigError(
                f"segmentor {what}: its classes {list(classes)} do not cover structure {v.measure.structure!r} "
                f"of variable {v.name!r} at index {c} (expected classes {list(ctx.info.class_names)})"
            )


def _read_segmentor_import(ctx: StageContext, path: Path) -> dict[str, torch.Tensor]:
    """The weights in ``--segmentor-checkpoint`` (a segcft checkpoint, a plain state dict or
    safetensors), checked against the run's segmentor plugin and structures."""
    seg = build_component("segmentor", ctx.cfg.segmentor, ctx.info)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: dict[str, Any] = {"model": load_file(str(path))}
        except Exception as e:
            raise UserError(f"--segmentor-checkpoint {path}: cannot be read as safetensors: {e}") from None
    else:
        loaded = load_checkpoint(path)
        if "model" not in loaded:
            loaded = {"model": loaded}
    load_model_state(seg, loaded, path, f"segmentor {ctx.cfg.segmentor.name!r}")
    _check_classes(ctx, seg, str(path))
    state: dict[str, torch.Tensor] = seg.state_dict()
    return state


def _segmentor_changes(ctx: StageContext) -> bool:
    """Whether the imported segmentor differs from the run's current one (or it has none)."""
    assert ctx.segmentor_import is not None
    try:
        current = load_checkpoint(ctx.run.final("segmentor")).get("model")
    except UserError:
        return True
    new = ctx.segmentor_import
    return not (
        isinstance(current, dict)
        and current.keys() == new.keys()
        and all(isinstance(current[k], torch.Tensor) and torch.equal(current[k], new[k]) for k in new)
    )


# -- entry point ------------------------------------------------------------------------------
def _select_stages(all_stages: list[str], only: list[str] | None, from_stage: str | None) -> set[str]:
    """The stages to redo (their checkpoints are discarded first)."""

    def expand(name: str) -> list[str]:
        if name == "cft":
            return [s for s in all_stages if s.startswith("cft-")]
        if name == "segmentor":  # the guide: every member of an ensemble
            return [s for s in all_stages if s == name or s.startswith("segmentor-")]
        if name not in all_stages:
            raise UserError(f"unknown stage {name!r}; stages of this run: {['cft', *all_stages]}")
        return [name]

    redo: set[str] = set()
    for name in only or []:
        redo.update(expand(name))
    if from_stage is not None:
        first = expand(from_stage)
        if first:
            redo.update(all_stages[all_stages.index(first[0]) :])
    return redo


def _check_request(
    cfg: Any,
    run: RunDir,
    resume: str | None,
    only: list[str] | None,
    from_stage: str | None,
    segmentor_checkpoint: Path | str | None,
) -> tuple[Any, bool, Path | None]:
    """The options of ``run_training`` checked against each other and the run folder: the
    config to run (the stored one with resume-safe changes when resuming), whether to resume,
    and the segmentor checkpoint to import."""
    from segcft.config import resume_config, run_config_to_dict

    if resume is not None and resume != "auto":
        path = Path(resume)
        if not (path.is_file() and path.parent.resolve() == run.checkpoints.resolve()):
            raise UserError(f"--resume: expected 'auto' or a checkpoint file in {run.checkpoints}, got {resume!r}")
        resume = "auto"  # a stage's last checkpoint is the newest state of the unfinished stage
    if only and from_stage:
        raise UserError("--only and --from-stage cannot be combined")
    if run.is_run():
        previous = run.read_config()
        if resume == "auto":
            cfg = resume_config(previous, cfg, run.config)
        elif run_config_to_dict(previous) != run_config_to_dict(cfg):
            raise UserError(
                f"{run.root} holds a run with a different config; use another output folder, "
                "or --resume auto to continue it"
            )
    seg_path = None if segmentor_checkpoint is None else Path(segmentor_checkpoint)
    if seg_path is not None:
        if not seg_path.is_file():
            raise UserError(f"--segmentor-checkpoint {seg_path} does not exist")
        if not cfg.segmentor.name:
            raise UserError("--segmentor-checkpoint needs a segmentor plugin (segmentor.name)")
        if cfg.train.segmentor.guides > 1:
            raise UserError(
                f"--segmentor-checkpoint imports one guide, but train.segmentor.guides is "
                f"{cfg.train.segmentor.guides}; set it to 1 to import"
            )
    return cfg, resume == "auto", seg_path


def _prepare(ctx: StageContext, only: list[str] | None, from_stage: str | None) -> list[str]:
    """Validate, store config and dataset metadata, invalidate the stages to redo; returns the
    stages of this invocation in order."""
    stages = stage_names(ctx.cfg)
    redo = _select_stages(stages, only, from_stage)
    if ctx.segmentor_checkpoint is not None:
        redo.add("segmentor")  # imported whenever given, also beside --only
    if only:
        stages = [s for s in stages if s in redo]
    validate(ctx, [s for s in stages if s in redo or not ctx.run.done(s)])
    stale: set[str] = set()
    if ctx.segmentor_import is not None and _segmentor_changes(ctx):
        # the stages that use the segmentor are redone from scratch with the imported one
        stale = {s for s in stages if s in ("cft-seg", "cft-pos-seg", "evaluate")}
        redo |= stale
    if ctx.d.main:
        ctx.run.root.mkdir(parents=True, exist_ok=True)
        ctx.run.write_config(ctx.cfg)
        ctx.run.write_dataset_info(ctx.info)
    ctx.d.barrier()
    for stage in stages:
        if stage in redo:
            ctx.invalidate(stage, stale=stage in stale)
    return stages


def _run_stages(ctx: StageContext, stages: list[str]) -> dict[str, Any]:
    """Run every stage that is not complete, in table order, side by side where the lane plan
    says so (segcft/train/lanes.py); returns the evaluation's metrics (empty when evaluation did
    not run now)."""
    result: dict[str, Any] = {}
    threads = torch.get_num_threads()
    lanes = ctx.cfg.cpu_lanes if lanes_possible(ctx) else 1
    waves = [
        [Lane(lane.threads, tuple(s for s in lane.stages if s in stages)) for lane in wave]
        for wave in plan_waves(ctx.cfg, stage_names(ctx.cfg), threads, lanes)
    ]
    todo = [s for s in stages if not ctx.run.done(s)]
    eval_n = ctx.cfg.evaluate.n
    if eval_n is None and "evaluate" in todo:  # null: the whole split
        eval_n = len(build_dataset(ctx.cfg, ctx.cfg.evaluate.split))
    ctx.clock = RunClock(ctx.cfg, todo, ctx.d.main, EPS_SAMPLES, waves, dims=ctx.info.spatial_dims, eval_n=eval_n)
    for wave in waves:
        for stage in (s for lane in wave for s in lane.stages if ctx.run.done(s)):
            if ctx.d.main:
                print(f"[{stage}] done (checkpoint exists), skipped", flush=True)
        busy = [lane for lane in wave if any(s in todo for s in lane.stages)]
        ctx.clock.start_wave()
        if len(busy) > 1:
            run_lanes(ctx, busy)
            ctx.curves()
            continue
        for lane in busy:
            with _threads(lane.threads):
                for stage in lane.stages:
                    if stage not in todo:
                        continue
                    out = run_stage(ctx, stage)
                    if isinstance(out, dict):
                        result = out
                    ctx.curves()
    return result


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` (a lane's share, also when it trains alone) for the block."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def run_training(
    cfg: Any,
    run_dir: Path | str,
    *,
    resume: str | None = None,
    only: list[str] | None = None,
    from_stage: str | None = None,
    segmentor_checkpoint: Path | str | None = None,
) -> Path:
    """Train every stage of the run that has no final checkpoint yet, redoing those from
    ``from_stage`` on (or exactly the stages in ``only``, which then run alone), evaluate, and
    return the path of report.md.

    ``resume="auto"`` continues an unfinished stage from its last checkpoint; ``cfg`` must then
    equal the run folder's stored config but for the keys that are safe to change on resume
    (``segcft.config.RESUME_SAFE_KEYS``). ``segmentor_checkpoint`` is imported as the segmentor
    stage (also beside ``only``); when it changes the run's segmentor, the stages that use it are
    redone."""
    run = RunDir(run_dir)
    cfg, resuming, seg_path = _check_request(cfg, run, resume, only, from_stage, segmentor_checkpoint)
    device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = init_distributed(device_kind)
    try:
        device = resolve_device(cfg.device, d)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            keep_freed_memory()
        ctx = StageContext(cfg, run, d, device, resuming)
        ctx.segmentor_checkpoint = seg_path
        result = _run_stages(ctx, _prepare(ctx, only, from_stage))
        ctx.metrics.close()
        # every rank reaches the teardown together: a rank that destroys its gloo group and exits
        # while another is still talking to it can abort that one ("terminate called ...")
        d.barrier()
        if d.main and run.report.is_file():
            if not result and run.metrics_json.is_file():
                result = run.read_metrics()
            from segcft.evaluation.report import print_headline

            print_headline(run.root, result)
        return run.report
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
