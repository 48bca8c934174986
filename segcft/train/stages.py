"""The stages of a run, as one table: each entry names the stage, the stages whose final
checkpoints it reads, what it produces and how it runs. ``segcft train`` walks the table in
order; adding a stage is one entry (and its run function)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component
from segcft.config import MechanismsStageConfig, StageConfig, component_section, derived_seed
from segcft.dscm import DSCM
from segcft.objectives.base import build_objective
from segcft.objectives.modes import objective_guides, objective_index
from segcft.run import generator_state, guide_from, guide_stages
from segcft.train.context import StageContext
from segcft.train.gate import gate_imported, gated_segmentor
from segcft.train.loop import fit
from segcft.train.losses import CFTLoss, GeneratorLoss, MechanismsLoss, RegressorLoss, SegmentorLoss

__all__ = ["EPS_SAMPLES", "STAGES", "STAGE_TABLE", "Stage", "run_stage", "stage_entry", "stage_names"]

EPS_SAMPLES = 512
"""eps is the mean nelbo over (a seeded subset of at most this many samples of) the training split."""

MECHANISMS_CHECKPOINT_EVERY = 500
"""Steps between resume checkpoints of the mechanisms stage."""

"""Fine-tuning modes guided by the segmentor."""


# -- the stages -------------------------------------------------------------------------------
def stage_mechanisms(ctx: StageContext, stage: str) -> None:
    """The parent SCM by maximum likelihood on the training parents: minibatches drawn with
    replacement from a generator seeded with the run seed (``parent_batches``), AdamW without
    warm-up, gradients clipped at 10; on the CPU, every rank training on whole batches."""
    from segcft.models.mechanisms import ParentSCM, parent_batches

    sc = ctx.cfg.train.mechanisms
    parents = _training_parents(ctx)
    torch.manual_seed(ctx.cfg.seed)
    scm = ParentSCM(ctx.info, ctx.cfg.mechanisms)
    scm.check_training_data(parents)
    loss = MechanismsLoss(scm)

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        return ({"parents": pa} for pa in parent_batches(parents, sc.batch_size, ctx.cfg.seed, start))

    trained = fit(ctx, stage, scm, loss, _mechanisms_schedule(sc), ctx.cfg.seed, batches=batches, replicated=True)
    ctx.save_final(stage, {"model": trained.state_dict(), "nll": loss.last})


def _mechanisms_schedule(sc: MechanismsStageConfig) -> StageConfig:
    """The loop settings of the mechanisms stage: its config section, no warm-up, EMA or update
    skipping, gradients clipped at ``GRAD_CLIP``, a resume checkpoint every
    ``MECHANISMS_CHECKPOINT_EVERY`` steps."""
    from segcft.models.mechanisms import GRAD_CLIP

    return StageConfig(
        steps=sc.steps,
        batch_size=sc.batch_size,
        lr=sc.lr,
        weight_decay=sc.weight_decay,
        warmup=0,
        grad_clip=GRAD_CLIP,
        grad_skip=0.0,
        ema=0.0,
        log_every=sc.log_every,
        checkpoint_every=MECHANISMS_CHECKPOINT_EVERY,
    )


def _training_parents(ctx: StageContext) -> torch.Tensor:
    """(N, P) normalised parents of the training split. A phantom gives them without
    rendering its images (``subjects``); any other dataset is read through."""
    subjects = getattr(ctx.train_set, "subjects", None)
    if callable(subjects):
        _, physical = subjects(range(len(ctx.train_set)))
        return ctx.info.normalise(physical.double()).float()
    loader = DataLoader(ctx.train_set, batch_size=64, shuffle=False, num_workers=0)
    return torch.cat([b["parents"] for b in loader]).float()


GUIDE_SEED_STEP = 20
"""Guide member k (stage ``segmentor-k``, k >= 2) trains with seed s + GUIDE_SEED_STEP * (k - 1)."""


def segmentor_seed(seed: int, stage: str) -> int:
    """The seed of a segmentor stage in a run of ``seed``: the guide s, the evaluation segmentor
    s + 1, guide member k s + GUIDE_SEED_STEP * (k - 1)."""
    if stage == "eval_segmentor":
        return seed + 1
    if stage == "segmentor":
        return seed
    return seed + GUIDE_SEED_STEP * (int(stage.rsplit("-", 1)[1]) - 1)


def stage_segmentor(ctx: StageContext, stage: str) -> None:
    """The guide (``segmentor``, seed s, or the imported ``--segmentor-checkpoint``; with
    ``train.segmentor.guides`` > 1 also its members ``segmentor-k``) and the evaluation segmentor
    (``eval_segmentor``, seed s+1), each through the quality gate (a retry with seed +
    RETRY_SEED_OFFSET and twice the steps when a structure is not learned; an imported guide is
    measured, not retrained)."""
    if stage == "segmentor" and ctx.segmentor_import is not None and ctx.segmentor_checkpoint is not None:
        imported = build_component("segmentor", ctx.cfg.segmentor, ctx.info)
        imported.load_state_dict(ctx.segmentor_import)  # checked against the plugin by validation
        gate_imported(ctx, stage, imported.to(ctx.device).eval(), ctx.segmentor_checkpoint)
        ctx.save_final(stage, {"model": ctx.segmentor_import, "source": str(ctx.segmentor_checkpoint)})
        return

    def train(name: str, seed: int, sc: StageConfig) -> torch.nn.Module:
        torch.manual_seed(seed)
        seg = build_component("segmentor", component_section(ctx.cfg, "segmentor", stage), ctx.info).to(ctx.device)
        rng = torch.Generator(device=ctx.device).manual_seed(seed + 104_729)  # saved with the stage's resume state
        loss = SegmentorLoss(seg, ctx.cfg.train.segmentor_intensity, rng)
        return fit(ctx, name, seg, loss, sc, seed, rng=rng, channels_last=True)

    trained, seed = gated_segmentor(ctx, stage, segmentor_seed(ctx.cfg.seed, stage), train)
    ctx.save_final(stage, {"model": trained.state_dict(), "seed": seed})


def stage_regressor(ctx: StageContext, stage: str) -> None:
    """The parent regressor (reg mode's guide), then its calibration on the validation split:
    each continuous variable's attenuation (how far its prediction follows the true value with
    the variable's parents held fixed), logged and stored beside the weights."""
    from segcft.components import build_dataset
    from segcft.models.calibration import CALIBRATION_SAMPLES, fit_calibration

    seed = ctx.cfg.seed + 2
    torch.manual_seed(seed)
    reg = build_component("regressor", ctx.cfg.regressor, ctx.info).to(ctx.device)
    trained = fit(ctx, stage, reg, RegressorLoss(reg), ctx.cfg.train.regressor, seed)
    val = build_dataset(ctx.cfg, "val")
    calibration = fit_calibration(trained, val, ctx.info, ctx.device)
    fitted = [
        (v.name, float(calibration["attenuation"][j]))
        for j, v in enumerate(ctx.info.variables)
        if bool(calibration["fitted"][j])
    ]
    if ctx.d.main:
        if fitted:
            shown = ", ".join(f"{name} {s:.2f}" for name, s in fitted)
            print(
                f"[{stage}] attenuation on {min(len(val), CALIBRATION_SAMPLES)} validation subjects (the "
                f"prediction's slope on the true value, parents fixed; 1: follows it): {shown}",
                flush=True,
            )
        else:
            print(f"[{stage}] no calibration: the validation split is empty or too small", flush=True)
    ctx.metrics.log(stage, ctx.cfg.train.regressor.steps, {f"attenuation/{name}": s for name, s in fitted})
    ctx.save_final(stage, {"model": trained.state_dict(), "calibration": calibration})


def _generator_channels_last(ctx: StageContext) -> bool:
    """Generator stages train in channels-last layout in 2D only: in 3D a 150-step generator stage
    and a 40-step Pos-Seg-CFT stage ran at the same speed either way (2026-12-06)."""
    return ctx.info.spatial_dims == 2


def stage_generator(ctx: StageContext, stage: str) -> None:
    """The generator by its ELBO, then eps (its training-set nelbo)."""
    seed = ctx.cfg.seed + 3
    torch.manual_seed(seed)
    gen = build_component("generator", ctx.cfg.generator, ctx.info).to(ctx.device)
    trained = fit(
        ctx,
        stage,
        gen,
        GeneratorLoss(gen),
        ctx.cfg.train.generator,
        seed,
        betas=(0.9, 0.9),
        channels_last=_generator_channels_last(ctx),
    )
    eps = _measure_eps(ctx, trained)
    if ctx.d.main:
        print(f"[generator] eps (training-set nelbo per pixel) = {eps:.5f}", flush=True)
    ctx.metrics.log(stage, ctx.cfg.train.generator.steps, {"eps": eps})
    ctx.save_final(stage, {"model": trained.state_dict(), "eps": eps})


@torch.no_grad()
def _measure_eps(ctx: StageContext, gen: Any) -> float:
    """Mean per-pixel nelbo of the trained generator on the training split (a seeded subset of
    at most EPS_SAMPLES samples), with a fixed seed for the posterior draws."""
    n = len(ctx.train_set)
    g = torch.Generator().manual_seed(ctx.cfg.seed + 4)
    idx = torch.randperm(n, generator=g)[: min(n, EPS_SAMPLES)].tolist()
    subset = torch.utils.data.Subset(ctx.train_set, idx)
    loader = DataLoader(subset, batch_size=max(ctx.cfg.train.generator.batch_size, 1), shuffle=False)
    torch.manual_seed(ctx.cfg.seed + 4)
    total, count = 0.0, 0
    gen.eval()
    for batch in loader:
        x, pa = batch["image"].to(ctx.device), batch["parents"].to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            nelbo = gen.elbo(x, pa)["nelbo"].float()
        total += float(nelbo.sum())
        count += x.shape[0]
    return total / count


def stage_cft(ctx: StageContext, stage: str) -> None:
    """Fine-tune a copy of the generator in one mode (``cft-<mode>``) under the Lagrangian."""
    cfg, run, mode = ctx.cfg, ctx.run, stage[len("cft-") :]
    seed = cfg.seed + 10 + objective_index(mode)
    torch.manual_seed(seed)
    from segcft.models.mechanisms import ParentSCM

    mech = ParentSCM(ctx.info, cfg.mechanisms)
    load_model_state(mech, load_checkpoint(run.final("mechanisms")), run.final("mechanisms"), "parent mechanisms")
    mech = mech.to(ctx.device).eval().requires_grad_(False)
    gen_state = generator_state(run.final("generator"))
    gen = build_component("generator", cfg.generator, ctx.info)
    load_model_state(gen, gen_state, run.final("generator"), f"generator {cfg.generator.name!r}")
    gen = gen.to(ctx.device)
    guides = {
        kind: guide_from([ctx.load_frozen(kind, s) for s in guide_stages(cfg)])
        if kind == "segmentor"
        else ctx.load_regressor()
        for kind in objective_guides(mode, cfg)
    }
    objective = build_objective(mode, ctx.info, cfg.cft, float(gen_state["eps"]), **guides).to(ctx.device)
    rng = torch.Generator().manual_seed(derived_seed(seed * 1000 + ctx.d.rank))
    loss_fn = CFTLoss(DSCM(ctx.info, mech, gen), objective, rng)
    gen = fit(
        ctx,
        stage,
        gen,
        loss_fn,
        cfg.cft,
        seed,
        betas=(0.9, 0.9),
        extra_opt=objective.lagrange_optimizer(),
        after_step=objective.clamp_lambda,
        rng=rng,
        channels_last=_generator_channels_last(ctx),
    )
    ctx.save_final(
        stage, {"model": gen.state_dict(), "eps": float(gen_state["eps"]), "lambda": float(objective.lmbda.detach())}
    )


def stage_evaluate(ctx: StageContext, stage: str) -> dict[str, Any]:
    """metrics.json, report.md and figures of the finished run (rank 0); returns the metrics."""
    from segcft.evaluate import evaluate_run

    ctx.curves()
    result: dict[str, Any] = {}
    if ctx.d.main:
        ev = ctx.cfg.evaluate
        result = evaluate_run(ctx.run.root, split=ev.split, n=ev.n)
    ctx.d.barrier()
    return result


def run_stage(ctx: StageContext, stage: str) -> Any:
    """Train the concrete ``stage`` and print its wall time (rank 0); returns what it returns."""
    t0 = time.perf_counter()
    out = stage_entry(ctx.cfg, stage).run(ctx, stage)
    if ctx.d.main:
        print(f"[{stage}] finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# -- the table --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One entry of the stage table. ``name`` is what ``--only`` and ``--from-stage`` accept;
    ``instances(cfg)`` gives the concrete stages it runs as in a run (default: just ``name``);
    ``requires(cfg, stage)`` the stages whose final checkpoints the concrete ``stage`` reads;
    ``run(ctx, stage)`` trains it and writes what ``produces`` says. Neighbouring stages that
    are ``side_by_side`` do not read each other's results: on the CPU they may train at the
    same time in separate processes (segcft/train/lanes.py); a stage that ``joins_wave`` may
    train beside the side-by-side stages before it when that ends sooner (uneven lanes)."""

    name: str
    produces: str
    run: Callable[[StageContext, str], Any]
    requires: Callable[[Any, str], tuple[str, ...]] = lambda cfg, stage: ()
    instances: Callable[[Any], list[str]] | None = None
    side_by_side: bool = False
    joins_wave: bool = False

    def concrete(self, cfg: Any) -> list[str]:
        """The concrete stages of this entry in the run of ``cfg``, in order."""
        return [self.name] if self.instances is None else self.instances(cfg)


def _cft_requires(cfg: Any, stage: str) -> tuple[str, ...]:
    guides = objective_guides(stage[len("cft-") :], cfg)
    return ("mechanisms", "generator", *(s for g in guides for s in (guide_stages(cfg) if g == "segmentor" else [g])))


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "mechanisms",
        "checkpoints/mechanisms.pt (ParentSCM weights, final nll)",
        stage_mechanisms,
        side_by_side=True,
    ),
    Stage(
        "segmentor",
        "checkpoints/segmentor.pt (the guide: weights, seed or source); segmentor-k.pt per further guide member",
        stage_segmentor,
        instances=guide_stages,
        side_by_side=True,
    ),
    Stage(
        "eval_segmentor",
        "checkpoints/eval_segmentor.pt (weights, seed)",
        stage_segmentor,
        instances=lambda cfg: ["eval_segmentor"] if cfg.segmentor.name else [],
        side_by_side=True,
    ),
    Stage(
        "regressor",
        "checkpoints/regressor.pt (weights, calibration)",
        stage_regressor,
        instances=lambda cfg: ["regressor"] if cfg.regressor.name else [],
        side_by_side=True,
    ),
    Stage("generator", "checkpoints/generator.pt (weights, eps)", stage_generator, joins_wave=True),
    Stage(
        "cft",
        "checkpoints/cft-<mode>.pt per mode but none (weights, eps, lambda)",
        stage_cft,
        requires=_cft_requires,
        instances=lambda cfg: [f"cft-{m}" for m in cfg.cft.modes if m != "none"],
        side_by_side=True,
    ),
    Stage(
        "evaluate",
        "metrics.json, report.md, figures/",
        stage_evaluate,
        requires=lambda cfg, stage: tuple(s for s in stage_names(cfg) if s != "evaluate"),
    ),
)

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
"""Stage groups in order; ``cft`` expands to ``cft-<mode>`` for every fine-tuned mode."""


def stage_names(cfg: Any) -> list[str]:
    """The concrete stages of a run, in order (``cft`` expanded per mode)."""
    return [name for entry in STAGE_TABLE for name in entry.concrete(cfg)]


def stage_entry(cfg: Any, stage: str) -> Stage:
    """The table entry that runs the concrete ``stage``."""
    return next(entry for entry in STAGE_TABLE if stage in entry.concrete(cfg))
