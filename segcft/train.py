"""The training pipeline behind ``segcft train``: every stage of a DSCM, its fine-tuned copies,
evaluation and report, in one resumable run folder (docs/design.md, "Run directory" and "Scale").

Stages, in order: ``mechanisms`` (parent SCM) -> ``segmentor`` (the guide, seed s) and
``eval_segmentor`` (seed s+1, grades the guide's work) -> ``regressor`` -> ``generator`` (and
eps, its training-set nelbo) -> ``cft-<mode>`` for every fine-tuning mode -> ``evaluate``
(metrics.json, report.md, figures). A stage whose final checkpoint exists is skipped; ``only``
and ``from_stage`` redo chosen stages. Components come from the plugin registry by name.

Run folder: ``config.yaml`` (resolved), ``dataset.json`` (metadata and normalisation),
``checkpoints/<stage>.pt`` (final) and ``checkpoints/<stage>.last.pt`` (resume state: weights,
optimiser, schedule, EMA, step, RNG), ``metrics.csv`` (+ ``tensorboard/`` when installed),
``report.md``, ``metrics.json`` and ``figures/``. Under ``torchrun`` the stages run with DDP
(NCCL on GPUs, gloo on CPUs); rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from segcft.checkpoint import (
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
    write_json,
)
from segcft.components import build_component, build_dataset, registry_entry
from segcft.config import derived_seed
from segcft.data.variables import DatasetInfo
from segcft.distributed import Dist, init_distributed, resolve_device
from segcft.dscm import DSCM
from segcft.errors import ConfigError, UserError
from segcft.objectives.base import CFTObjective, build_objective
from segcft.objectives.modes import check_mode, objective_guides, objective_index
from segcft.run import Run, generator_state, load_run
from segcft.models.segmentation import segmentation_loss

__all__ = ["STAGES", "Run", "load_run", "run_training", "stage_names"]


STAGES: tuple[str, ...] = ("mechanisms", "segmentor", "eval_segmentor", "regressor", "generator", "cft", "evaluate")
"""Stage groups in order; ``cft`` expands to ``cft-<mode>`` for every fine-tuned mode."""

EPS_SAMPLES = 512
"""eps is the mean nelbo over (a seeded subset of at most this many samples of) the training split."""


# -- metrics log ------------------------------------------------------------------------------
class _MetricsLog:
    """Append-only metrics.csv with a header that grows as stages log new keys (the file is
    rewritten atomically when it does), plus TensorBoard scalars when tensorboard is installed.
    A row torn by a kill mid-append is dropped (with a warning) and the file rewritten."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.columns: list[str] = ["stage", "step"]
        self.rows: list[dict[str, str]] = []
        self.tb: Any = None
        if not enabled:
            return
        if path.is_file():
            with open(path, newline="") as f:
                text = f.read()
            reader = csv.DictReader(text.splitlines(keepends=True))
            self.columns = list(reader.fieldnames or self.columns)
            rows = list(reader)
            # a complete row has one value per column; a torn last one may lack its line end
            self.rows = [r for r in rows if None not in r and None not in r.values()]
            if self.rows and self.rows[-1] is rows[-1] and not text.endswith("\n"):
                self.rows.pop()
            if len(self.rows) != len(rows):
                print(f"warning: {path}: dropped {len(rows) - len(self.rows)} torn row(s) left by an interrupted run",
                      file=sys.stderr, flush=True)
                self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tb = None

    def drop_stage(self, stage: str, from_step: int = 0) -> None:
        """Forget rows of ``stage`` at or after ``from_step`` (a stage redone or resumed)."""
        if not self.enabled:
            return
        keep = [r for r in self.rows if not (r.get("stage") == stage and int(float(r.get("step") or 0)) >= from_step)]
        if len(keep) != len(self.rows):
            self.rows = keep
            self._rewrite()

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": str(step), **{k: f"{v:.6g}" for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.is_file():
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def _rewrite(self) -> None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -- progress -------------------------------------------------------------------------------
class _Progress:
    """tqdm bar on a terminal (rank 0), plain log lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool, every: int) -> None:
        self.stage, self.total, self.every, self.enabled = stage, total, max(every, 1), enabled
        self.bar = None
        self.t0, self.s0 = time.perf_counter(), start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = {k: logs[k] for k in list(logs)[:4]}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.stage}] step {step}/{self.total} {text} ({rate:.2f} steps/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- data order -------------------------------------------------------------------------------
class _ResumableSampler(Sampler[int]):
    """This rank's share of an endless, seeded sequence of shuffled epochs (DistributedSampler
    order), starting ``offset`` samples into it: data order survives a resume exactly.
    The global batch of step t is the same set of samples for any number of ranks."""

    def __init__(self, n: int, d: Dist, seed: int, offset: int = 0) -> None:
        self.n, self.d, self.seed, self.offset = n, d, seed, offset

    def __iter__(self) -> Iterator[int]:
        ds = DistributedSampler(range(self.n), num_replicas=self.d.world, rank=self.d.rank, shuffle=True,
                                seed=self.seed, drop_last=True)
        per_epoch = len(ds)
        if per_epoch == 0:
            raise UserError(f"the training split has {self.n} samples, fewer than the {self.d.world} ranks")
        epoch, skip = divmod(self.offset, per_epoch)
        while True:
            ds.set_epoch(epoch)
            yield from list(ds)[skip:]
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader needs no length
        return sys.maxsize


# -- the pipeline -----------------------------------------------------------------------------
def stage_names(cfg: Any, info: DatasetInfo | None = None) -> list[str]:
    """The concrete stages of a run, in order (``cft`` expanded per mode)."""
    out = ["mechanisms"]
    if cfg.segmentor.name:
        out += ["segmentor", "eval_segmentor"]
    if cfg.regressor.name:
        out.append("regressor")
    out.append("generator")
    out += [f"cft-{m}" for m in cfg.cft.modes if m != "none"]
    out.append("evaluate")
    return out


class _Pipeline:
    def __init__(self, cfg: Any, run_dir: Path, d: Dist, device: torch.device, resume: bool) -> None:
        self.cfg, self.run_dir, self.d, self.device, self.resume = cfg, run_dir, d, device, resume
        self.ck = run_dir / "checkpoints"
        self.amp = device.type == "cuda"
        self.metrics = _MetricsLog(run_dir / "metrics.csv", d.main)
        self.train_set = build_dataset(cfg, "train")
        self.info: DatasetInfo = self.train_set.info
        self.segmentor_checkpoint: Path | None = None
        self.segmentor_import: dict[str, torch.Tensor] | None = None  # its weights, read by validate

    # ---- validation: one clear line before any training ----
    def validate(self, stages: list[str]) -> None:
        cfg, info = self.cfg, self.info
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
                    f"{kind} {section.name!r} supports {dims} data only; dataset {cfg.dataset.name!r} is {info.spatial_dims}D"
                )
            if kind != "segmentor":
                build_component(kind, section, info)  # parameter errors surface now, not mid-run
        for mode in cfg.cft.modes:
            check_mode(mode, info)
            if mode == "reg" and not cfg.regressor.name:
                raise ConfigError("cft.modes: 'reg' needs a regressor (regressor.name)")
            if mode in ("seg", "pos-seg") and not cfg.segmentor.name:
                raise ConfigError(f"cft.modes: {mode!r} needs a segmentor (segmentor.name)")
        if self.segmentor_checkpoint is not None and "segmentor" in stages:
            self.segmentor_import = self._read_segmentor_import(self.segmentor_checkpoint)
        if cfg.segmentor.name:
            must_train = [s for s in ("segmentor", "eval_segmentor") if s in stages and not self._done(s)]
            if self.segmentor_checkpoint is not None and "segmentor" in must_train:
                must_train.remove("segmentor")
            if must_train and "mask" not in self.train_set[0]:
                raise ConfigError(
                    f"dataset {cfg.dataset.name!r} has no masks, but the {must_train[0]} stage must train a "
                    f"segmentor on them (use --segmentor-checkpoint, or a dataset with masks)"
                )
            self._check_classes(build_component("segmentor", cfg.segmentor, info), cfg.segmentor.name)
        self._check_checkpoints(stages)

    def _check_checkpoints(self, stages: list[str]) -> None:
        """The checkpoints that ``stages`` will read (finished stages they use, their own resume
        states) fit this run's components: a wrong one is one line now, not after hours of training."""
        uses: set[str] = set()
        for stage in stages:
            if stage.startswith("cft-"):
                uses |= {"mechanisms", "generator"} | ({"regressor"} if self.cfg.regressor.name else set())
                uses |= {"segmentor"} if stage in ("cft-seg", "cft-pos-seg") else set()
            elif stage == "evaluate":
                uses |= {s for s in stage_names(self.cfg) if s != "evaluate"}
        paths = [self._final(s) for s in sorted(uses) if s not in stages and self._done(s)]
        paths += [self._last(s) for s in stages if self.resume and self._last(s).is_file()]
        for path in paths:
            stage = path.name.split(".")[0]
            kind = "segmentor" if stage == "eval_segmentor" else "generator" if stage.startswith("cft-") else stage
            if kind == "mechanisms":
                from segcft.models.mechanisms import ParentSCM

                module, what = ParentSCM(self.info, self.cfg.mechanisms), "parent mechanisms"
            else:
                section = getattr(self.cfg, kind)
                module, what = build_component(kind, section, self.info), f"{kind} {section.name!r}"
            load_model_state(module, load_checkpoint(path), path, what)

    def _check_classes(self, seg: nn.Module, what: str) -> None:
        classes = tuple(getattr(seg, "classes", ()))
        for v in self.info.structure_variables:
            assert v.measure is not None
            c = self.info.class_index(v.measure.structure)
            if c >= len(classes) or classes[c] != v.measure.structure:
                raise ConfigError(
                    f"segmentor {what}: its classes {list(classes)} do not cover structure {v.measure.structure!r} "
                    f"of variable {v.name!r} at index {c} (expected classes {list(self.info.class_names)})"
                )

    # ---- checkpoints ----
    def _final(self, stage: str) -> Path:
        return self.ck / f"{stage}.pt"

    def _last(self, stage: str) -> Path:
        return self.ck / f"{stage}.last.pt"

    def _done(self, stage: str) -> bool:
        if stage == "evaluate":
            return (self.run_dir / "report.md").is_file() and (self.run_dir / "metrics.json").is_file()
        return self._final(stage).is_file()

    def _save_final(self, stage: str, state: dict[str, Any]) -> None:
        if self.d.main:
            save_checkpoint(self._final(stage), {"stage": stage, **state})
            if self._last(stage).is_file():
                self._last(stage).unlink()
        self.d.barrier()

    def invalidate(self, stage: str, stale: bool = False) -> None:
        """Forget a stage's results so that it is trained again (its last checkpoint survives
        when resuming, unless ``stale``: the redo then continues where it was interrupted)."""
        if self.d.main:
            doomed = [self._final(stage)] + ([] if self.resume and not stale else [self._last(stage)])
            for p in doomed:
                if p.is_file():
                    p.unlink()
            if stage == "evaluate":
                for name in ("report.md", "metrics.json"):
                    if (self.run_dir / name).is_file():
                        (self.run_dir / name).unlink()
        self.d.barrier()

    # ---- the generic training loop ----
    def fit(
        self,
        stage: str,
        model: nn.Module,
        loss_fn: nn.Module,
        sc: Any,
        seed: int,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        extra_opt: torch.optim.Optimizer | None = None,
        after_step: Callable[[], None] | None = None,
        rng: torch.Generator | None = None,
        channels_last: bool = False,
    ) -> nn.Module:
        """Train ``model`` (the parameters that require grad) by minimising ``loss_fn(batch)``
        (an nn.Module returning a dict with ``loss``) for ``sc.steps`` steps; returns the EMA copy
        when ``sc.ema`` > 0, else ``model``. Resumes from ``<stage>.last.pt`` when asked.
        ``channels_last`` runs a 2D convolutional model and its images in NHWC layout (faster
        convolutions on CPUs and GPUs; same maths); the returned model is contiguous again."""
        from segcft.optim import EMA, GuardedStepper, build_optimizer

        layout = torch.channels_last if channels_last and self.info.spatial_dims == 2 else None
        if layout is not None:
            model.to(memory_format=layout)

        if sc.steps < 1 or sc.batch_size < self.d.world:
            raise ConfigError(f"train.{stage}: steps must be >= 1 and batch_size >= the number of ranks ({self.d.world})")
        if sc.batch_size % self.d.world:
            raise ConfigError(f"train.{stage}.batch_size {sc.batch_size} is not divisible by the {self.d.world} ranks")
        params = [p for p in model.parameters() if p.requires_grad]
        if self.d.main:
            print(f"[{stage}] {type(model).__name__}: {sum(p.numel() for p in params):,} trainable parameters",
                  flush=True)
        opt, sched = build_optimizer(params, lr=sc.lr, weight_decay=sc.weight_decay, warmup=sc.warmup, betas=betas)
        ema = EMA(model, sc.ema) if sc.ema > 0 else None
        stepper = GuardedStepper(params, opt, sched, sc.grad_clip, sc.grad_skip, ema, model)
        step, count = 0, 0
        sums: dict[str, float] = {}  # of the steps since the last metrics row
        last = self._last(stage)
        if self.resume and last.is_file():
            state = load_checkpoint(last)
            load_model_state(model, state, last, f"{stage} stage's {type(model).__name__}")
            try:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                if ema is not None:
                    ema.load_state_dict(state["ema"])
                stepper.load_state_dict(state["stepper"])
                if extra_opt is not None:
                    extra_opt.load_state_dict(state["extra_optimizer"])
                    loss_fn.load_state_dict(state["loss_fn"])
                if rng is not None:
                    generators = state["generator"] if isinstance(state["generator"], list) else [state["generator"]]
                    rng.set_state(generators[min(self.d.rank, len(generators) - 1)])
                restore_rng(state["rng"][min(self.d.rank, len(state["rng"]) - 1)])
                step = int(state["step"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                detail = f"no {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [""])[0]
                raise UserError(f"checkpoint {last}: not a resume state of this run's {stage} stage: {detail}") from None
            sums, count = dict(state.get("log_sums", {})), int(state.get("log_count", 0))
            self.metrics.drop_stage(stage, step + 1)
            if self.d.main:
                print(f"[{stage}] resuming from {last} at step {step}", flush=True)
        else:
            self.metrics.drop_stage(stage)
        wrapped: nn.Module = loss_fn
        if self.d.enabled:
            # a plugin may hold parameters that a loss leaves unused (the HVAE's last prior
            # projection): they keep no gradient, as in one process
            wrapped = nn.parallel.DistributedDataParallel(
                loss_fn, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        local_batch = sc.batch_size // self.d.world
        sampler = _ResumableSampler(len(self.train_set), self.d, seed, offset=step * local_batch)
        # The loader's own generator: creating its iterator draws a base seed, which must not
        # move the global RNG that a resume has just restored.
        loader = DataLoader(
            self.train_set, batch_size=local_batch, sampler=sampler, drop_last=True,
            num_workers=4 if self.device.type == "cuda" else 0, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),
        )
        progress = _Progress(stage, sc.steps, step, self.d.main, sc.log_every)
        model.train()
        t0 = time.perf_counter()
        batches = iter(loader)
        while step < sc.steps:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            if layout is not None:
                batch["image"] = batch["image"].contiguous(memory_format=layout)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = wrapped(batch)
            out["loss"].backward()
            result = stepper.step(out["loss"])
            if extra_opt is not None:
                if not result.skipped:
                    extra_opt.step()
                extra_opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            step += 1
            logs = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
            logs["grad_norm"] = result.grad_norm
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            progress.update(step, logs)
            if step % sc.log_every == 0 or step == sc.steps:
                row = {k: v / count for k, v in sums.items()}
                row.update(lr=sched.get_last_lr()[0], skipped=float(stepper.counts["skipped_nonfinite"] + stepper.counts["skipped_norm"]),
                           samples_per_s=count * sc.batch_size / max(time.perf_counter() - t0, 1e-9))
                self.metrics.log(stage, step, row)
                sums, count, t0 = {}, 0, time.perf_counter()
            if sc.checkpoint_every and step % sc.checkpoint_every == 0 and step < sc.steps:
                self._save_last(stage, step, model, opt, sched, ema, stepper, extra_opt, loss_fn, rng, sums, count)
        progress.close()
        model.eval()
        trained = ema.module if ema is not None else model
        return trained.to(memory_format=torch.contiguous_format) if layout is not None else trained

    def _save_last(self, stage: str, step: int, model: nn.Module, opt: Any, sched: Any, ema: Any, stepper: Any,
                   extra_opt: Any, loss_fn: nn.Module, rng: torch.Generator | None, sums: dict[str, float],
                   count: int) -> None:
        """The resume state after ``step``: everything the next steps depend on, with the RNG
        states of every rank (global ones and ``rng``), and the partial sums of the next metrics row."""
        rng_states = [(capture_rng(), None if rng is None else rng.get_state())]
        if self.d.enabled:
            gathered: list[Any] = [None] * self.d.world
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if self.d.main:
            state: dict[str, Any] = {
                "stage": stage, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "stepper": stepper.state_dict(),
                "rng": [r for r, _ in rng_states], "log_sums": dict(sums), "log_count": count,
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            if extra_opt is not None:
                state["extra_optimizer"] = extra_opt.state_dict()
                state["loss_fn"] = loss_fn.state_dict()
            if rng is not None:
                state["generator"] = [g for _, g in rng_states]
            save_checkpoint(self._last(stage), state)
        self.d.barrier()

    # ---- stages ----
    def _seeded(self, seed: int) -> None:
        torch.manual_seed(seed)

    def stage_mechanisms(self) -> None:
        from segcft.models.mechanisms import ParentSCM

        sc = self.cfg.train.mechanisms
        parents = self._training_parents()
        self._seeded(self.cfg.seed)
        scm = ParentSCM(self.info, self.cfg.mechanisms)
        progress = _Progress("mechanisms", sc.steps, 0, self.d.main, sc.log_every)
        losses = scm.fit(parents, steps=sc.steps, lr=sc.lr, batch_size=sc.batch_size, seed=self.cfg.seed,
                         weight_decay=sc.weight_decay)
        self.metrics.drop_stage("mechanisms")
        for i in range(0, len(losses), max(sc.log_every, 1)):
            chunk = losses[i : i + sc.log_every]
            self.metrics.log("mechanisms", i + len(chunk), {"nll": sum(chunk) / len(chunk)})
        progress.update(sc.steps, {"nll": losses[-1]})
        progress.close()
        self._save_final("mechanisms", {"model": scm.state_dict(), "nll": losses[-1]})

    def _training_parents(self) -> torch.Tensor:
        """(N, P) normalised parents of the training split. A phantom gives them without
        rendering its images (``subjects``); any other dataset is read through."""
        subjects = getattr(self.train_set, "subjects", None)
        if callable(subjects):
            _, physical = subjects(range(len(self.train_set)))
            return self.info.normalise(physical.double()).float()
        loader = DataLoader(self.train_set, batch_size=64, shuffle=False, num_workers=0)
        return torch.cat([b["parents"] for b in loader]).float()

    def stage_segmentor(self, stage: str, seed: int) -> None:
        if stage == "segmentor" and self.segmentor_import is not None:
            self._save_final("segmentor", {"model": self.segmentor_import, "source": str(self.segmentor_checkpoint)})
            return
        self._seeded(seed)
        seg = build_component("segmentor", self.cfg.segmentor, self.info).to(self.device)
        rng = torch.Generator(device=self.device).manual_seed(seed + 104_729)  # saved with the stage's resume state
        loss = _SegmentorLoss(seg, self.cfg.train.segmentor_intensity, rng)
        trained = self.fit(stage, seg, loss, self.cfg.train.segmentor, seed, rng=rng)
        self._save_final(stage, {"model": trained.state_dict(), "seed": seed})

    def _read_segmentor_import(self, path: Path) -> dict[str, torch.Tensor]:
        """The weights in ``--segmentor-checkpoint`` (a segcft checkpoint, a plain state dict or
        safetensors), checked against the run's segmentor plugin and structures."""
        seg = build_component("segmentor", self.cfg.segmentor, self.info)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                loaded: dict[str, Any] = {"model": load_file(str(path))}
            except Exception as e:  # noqa: BLE001 - truncated or foreign file
                raise UserError(f"--segmentor-checkpoint {path}: cannot be read as safetensors: {e}") from None
        else:
            loaded = load_checkpoint(path)
            if "model" not in loaded:
                loaded = {"model": loaded}
        load_model_state(seg, loaded, path, f"segmentor {self.cfg.segmentor.name!r}")
        self._check_classes(seg, str(path))
        return seg.state_dict()

    def segmentor_changes(self) -> bool:
        """Whether the imported segmentor differs from the run's current one (or it has none)."""
        assert self.segmentor_import is not None
        try:
            current = load_checkpoint(self._final("segmentor")).get("model")
        except UserError:
            return True
        new = self.segmentor_import
        return not (isinstance(current, dict) and current.keys() == new.keys()
                    and all(isinstance(current[k], torch.Tensor) and torch.equal(current[k], new[k]) for k in new))

    def stage_regressor(self) -> None:
        seed = self.cfg.seed + 2
        self._seeded(seed)
        reg = build_component("regressor", self.cfg.regressor, self.info).to(self.device)
        trained = self.fit("regressor", reg, _RegressorLoss(reg), self.cfg.train.regressor, seed)
        self._save_final("regressor", {"model": trained.state_dict()})

    def stage_generator(self) -> None:
        seed = self.cfg.seed + 3
        self._seeded(seed)
        gen = build_component("generator", self.cfg.generator, self.info).to(self.device)
        trained = self.fit("generator", gen, _GeneratorLoss(gen), self.cfg.train.generator, seed, betas=(0.9, 0.9),
                           channels_last=True)
        eps = self._measure_eps(trained)
        if self.d.main:
            print(f"[generator] eps (training-set nelbo per pixel) = {eps:.5f}", flush=True)
        self.metrics.log("generator", self.cfg.train.generator.steps, {"eps": eps})
        self._save_final("generator", {"model": trained.state_dict(), "eps": eps})

    @torch.no_grad()
    def _measure_eps(self, gen: nn.Module) -> float:
        """Mean per-pixel nelbo of the trained generator on the training split (a seeded subset of
        at most EPS_SAMPLES samples), with a fixed seed for the posterior draws."""
        n = len(self.train_set)
        g = torch.Generator().manual_seed(self.cfg.seed + 4)
        idx = torch.randperm(n, generator=g)[: min(n, EPS_SAMPLES)].tolist()
        subset = torch.utils.data.Subset(self.train_set, idx)
        loader = DataLoader(subset, batch_size=max(self.cfg.train.generator.batch_size, 1), shuffle=False)
        torch.manual_seed(self.cfg.seed + 4)
        total, count = 0.0, 0
        gen.eval()
        for batch in loader:
            x, pa = batch["image"].to(self.device), batch["parents"].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                nelbo = gen.elbo(x, pa)["nelbo"].float()
            total += float(nelbo.sum())
            count += x.shape[0]
        return total / count

    def stage_cft(self, mode: str) -> None:
        cfg = self.cfg
        seed = cfg.seed + 10 + objective_index(mode)
        self._seeded(seed)
        from segcft.models.mechanisms import ParentSCM

        mech = ParentSCM(self.info, cfg.mechanisms)
        load_model_state(mech, load_checkpoint(self._final("mechanisms")), self._final("mechanisms"), "parent mechanisms")
        mech = mech.to(self.device).eval().requires_grad_(False)
        gen_state = generator_state(self._final("generator"))
        gen = build_component("generator", cfg.generator, self.info)
        load_model_state(gen, gen_state, self._final("generator"), f"generator {cfg.generator.name!r}")
        gen = gen.to(self.device)
        guides = {kind: self._load_frozen(kind, kind) for kind in objective_guides(mode, cfg)}
        objective = build_objective(mode, self.info, cfg.cft, float(gen_state["eps"]), **guides).to(self.device)
        rng = torch.Generator().manual_seed(derived_seed(seed * 1000 + self.d.rank))
        loss_fn = _CFTLoss(DSCM(self.info, mech, gen), objective, rng)
        stage = f"cft-{mode}"
        gen = self.fit(stage, gen, loss_fn, cfg.cft, seed, betas=(0.9, 0.9), extra_opt=objective.lagrange_optimizer(),
                       after_step=objective.clamp_lambda, rng=rng, channels_last=True)
        self._save_final(stage, {"model": gen.state_dict(), "eps": float(gen_state["eps"]),
                                 "lambda": float(objective.lmbda.detach())})

    def _load_frozen(self, kind: str, stage: str) -> nn.Module:
        section = getattr(self.cfg, kind)
        module = build_component(kind, section, self.info)
        load_model_state(module, load_checkpoint(self._final(stage)), self._final(stage), f"{kind} {section.name!r}")
        return module.to(self.device).eval().requires_grad_(False)

    def stage_evaluate(self) -> dict[str, Any]:
        from segcft.evaluate import evaluate_run

        result: dict[str, Any] = {}
        if self.d.main:
            ev = self.cfg.evaluate
            result = evaluate_run(self.run_dir, split=ev.split, n=ev.n)
        self.d.barrier()
        return result

    def curves(self) -> None:
        if self.d.main and self.metrics.path.is_file():
            from segcft.figures import plot_training_curves

            plot_training_curves(self.metrics.path, self.run_dir / "figures")


class _SegmentorLoss(nn.Module):
    """Dice + cross-entropy of segmentor logits against the label mask, on images whose global
    intensity is randomly scaled and shifted (``IntensityAugmentConfig``)."""

    def __init__(self, seg: nn.Module, intensity: Any, rng: torch.Generator) -> None:
        super().__init__()
        self.seg = seg
        self.rng = rng
        self.shift, self.scale = float(intensity.shift), float(intensity.scale)  # checked with the config

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = batch["image"]
        if self.shift > 0 or self.scale > 0:
            # draws for the whole global batch, this rank's share taken as the sampler interleaves
            # it: the same images get the same changes with any number of ranks
            ddp = dist.is_available() and dist.is_initialized()
            world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
            u = torch.rand((2, x.shape[0] * world), device=x.device, generator=self.rng)[:, rank::world]
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            a = (1.0 + self.scale * (2.0 * u[0] - 1.0)).view(shape)
            b = (self.shift * (2.0 * u[1] - 1.0)).view(shape)
            x = (a * (x + 1.0) - 1.0 + b).clamp(-1.0, 1.0)
        return {"loss": segmentation_loss(self.seg(x), batch["mask"])}


class _RegressorLoss(nn.Module):
    """Summed per-variable negative log-likelihood of the normalised parents."""

    def __init__(self, reg: nn.Module) -> None:
        super().__init__()
        self.reg = reg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"loss": self.reg.nll(batch["image"], batch["parents"]).float().sum(1).mean()}


class _GeneratorLoss(nn.Module):
    """The per-pixel negative ELBO."""

    def __init__(self, gen: nn.Module) -> None:
        super().__init__()
        self.gen = gen

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = self.gen.elbo(batch["image"], batch["parents"])
        return {"loss": out["loss"], "nll": float(out["nll"].detach()), "kl": float(out["kl"].detach())}


class _CFTLoss(nn.Module):
    """The fine-tuning Lagrangian as a module (DDP wraps it: generator weights and lambda are
    its parameters; mechanisms are frozen and the guides are not registered)."""

    def __init__(self, dscm: DSCM, objective: CFTObjective, rng: torch.Generator) -> None:
        super().__init__()
        self.dscm, self.objective = dscm, objective
        self.rng = rng

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = self.objective(self.dscm, batch, self.rng)
        out.pop("variable")
        return out


# -- entry point ------------------------------------------------------------------------------
def _select_stages(all_stages: list[str], only: list[str] | None, from_stage: str | None) -> set[str]:
    """The stages to redo (their checkpoints are discarded first)."""

    def expand(name: str) -> list[str]:
        if name == "cft":
            return [s for s in all_stages if s.startswith("cft-")]
        if name not in all_stages:
            raise UserError(f"unknown stage {name!r}; stages of this run: {['cft'] + all_stages}")
        return [name]

    redo: set[str] = set()
    for name in only or []:
        redo.update(expand(name))
    if from_stage is not None:
        first = expand(from_stage)
        if first:
            redo.update(all_stages[all_stages.index(first[0]) :])
    return redo


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
    from segcft.config import (
        dump_run_config,
        read_yaml,
        resume_config,
        run_config_from_dict,
        run_config_to_dict,
    )

    run_dir = Path(run_dir)
    if resume is not None and resume != "auto":
        path = Path(resume)
        if not (path.is_file() and path.parent.resolve() == (run_dir / "checkpoints").resolve()):
            raise UserError(f"--resume: expected 'auto' or a checkpoint file in {run_dir / 'checkpoints'}, got {resume!r}")
        resume = "auto"  # a stage's last checkpoint is the newest state of the unfinished stage
    if only and from_stage:
        raise UserError("--only and --from-stage cannot be combined")
    stored = run_dir / "config.yaml"
    if stored.is_file():
        previous = run_config_from_dict(read_yaml(stored))
        if resume == "auto":
            cfg = resume_config(previous, cfg, stored)
        elif run_config_to_dict(previous) != run_config_to_dict(cfg):
            raise UserError(
                f"{run_dir} holds a run with a different config; use another output folder, or --resume auto to continue it"
            )
    if segmentor_checkpoint is not None:
        segmentor_checkpoint = Path(segmentor_checkpoint)
        if not segmentor_checkpoint.is_file():
            raise UserError(f"--segmentor-checkpoint {segmentor_checkpoint} does not exist")
        if not cfg.segmentor.name:
            raise UserError("--segmentor-checkpoint needs a segmentor plugin (segmentor.name)")

    device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = init_distributed(device_kind)
    try:
        device = resolve_device(cfg.device, d)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pipe = _Pipeline(cfg, run_dir, d, device, resume == "auto")
        pipe.segmentor_checkpoint = segmentor_checkpoint
        stages = stage_names(cfg)
        redo = _select_stages(stages, only, from_stage)
        if segmentor_checkpoint is not None:
            redo.add("segmentor")  # imported whenever given, also beside --only
        if only:
            stages = [s for s in stages if s in redo]
        pipe.validate([s for s in stages if s in redo or not pipe._done(s)])
        stale: set[str] = set()
        if pipe.segmentor_import is not None and pipe.segmentor_changes():
            # the stages that use the segmentor are redone from scratch with the imported one
            stale = {s for s in stages if s in ("cft-seg", "cft-pos-seg", "evaluate")}
            redo |= stale
        if d.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_run_config(cfg, stored)
            write_json(run_dir / "dataset.json", pipe.info.to_dict())
        d.barrier()
        for stage in stages:
            if stage in redo:
                pipe.invalidate(stage, stale=stage in stale)
        result: dict[str, Any] = {}
        for stage in stages:
            if pipe._done(stage):
                if d.main:
                    print(f"[{stage}] done (checkpoint exists), skipped", flush=True)
                continue
            t0 = time.perf_counter()
            if stage == "mechanisms":
                pipe.stage_mechanisms()
            elif stage == "segmentor":
                pipe.stage_segmentor("segmentor", cfg.seed)
            elif stage == "eval_segmentor":
                pipe.stage_segmentor("eval_segmentor", cfg.seed + 1)
            elif stage == "regressor":
                pipe.stage_regressor()
            elif stage == "generator":
                pipe.stage_generator()
            elif stage.startswith("cft-"):
                pipe.stage_cft(stage[len("cft-") :])
            elif stage == "evaluate":
                pipe.curves()
                result = pipe.stage_evaluate()
            pipe.curves()
            if d.main:
                print(f"[{stage}] finished in {time.perf_counter() - t0:.1f} s", flush=True)
        pipe.metrics.close()
        if d.main and (run_dir / "report.md").is_file():
            if not result and (run_dir / "metrics.json").is_file():
                result = json.loads((run_dir / "metrics.json").read_text())
            _print_headline(run_dir, result)
        return run_dir / "report.md"
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _print_headline(run_dir: Path, result: dict[str, Any]) -> None:
    """The last lines of a run: where the report is and the numbers that matter."""
    for line in _headline_lines(result):
        print(line, flush=True)
    print(f"report: {run_dir / 'report.md'}", flush=True)


def _headline_lines(result: dict[str, Any]) -> list[str]:
    """Per intervened structure variable and mode: effectiveness MAPE (evaluation segmentor),
    leakage MAPE of the other structures and mean change outside the structure (0-255)."""
    lines: list[str] = []
    for name, entry in (result.get("interventions") or {}).items():
        if not entry.get("structure"):
            continue
        parts = []
        for mode in result.get("modes", []):
            e = entry["modes"].get(mode, {})
            parts.append(
                f"{mode}: MAPE {_mean(e, 'effectiveness', 'eval', 'mape')}%, leakage {_mean(e, 'leakage', 'mape_mean', 'eval')}%, "
                f"outside {_mean(e, 'locality', 'outside')}"
            )
        lines.append(f"do({name}) | " + " | ".join(parts))
    return lines


def _mean(d: Any, *path: str) -> str:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return "-"
        d = d[p]
    v = d.get("mean") if isinstance(d, dict) else d
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"
