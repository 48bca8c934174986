"""The one training loop of segcft: every trained stage minimises ``loss_fn(batch)`` through
:func:`fit` (optimiser with warm-up, guarded step, EMA, resume checkpoints, DDP)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from segcft.errors import ConfigError
from segcft.optim import EMA, GuardedStepper, build_optimizer
from segcft.train.context import StageContext, release_freed_memory
from segcft.train.progress import Progress
from segcft.train.resume import TrainState, restore_state
from segcft.train.sampler import ResumableSampler

__all__ = ["Batches", "fit"]

Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]
"""A stage's own batch source: this rank's batches from the given step on."""


def fit(
    ctx: StageContext,
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
    batches: Batches | None = None,
    replicated: bool = False,
) -> nn.Module:
    """Train ``model`` (the parameters that require grad) by minimising ``loss_fn(batch)``
    (an nn.Module returning a dict with ``loss``) for ``sc.steps`` steps; returns the EMA copy
    when ``sc.ema`` > 0, else ``model``. Resumes from ``<stage>.last.pt`` when asked.
    ``extra_opt`` steps further parameters of ``loss_fn`` (lambda) after every kept update and
    ``rng`` is the loss's own generator (both saved with the resume state). ``channels_last``
    runs a convolutional model and its images in NHWC (2D) or NDHWC (3D) layout (faster
    convolutions on CPUs and GPUs; same maths); the returned model is contiguous again.
    ``batches`` replaces the default data (the training split in :class:`ResumableSampler`
    order); ``replicated`` has every rank train on whole batches without DDP (a stage too small
    to share: the same weights on every rank as in one process). Batches go to the model's
    device."""
    device = next(model.parameters()).device
    layout = _LAYOUTS.get(ctx.info.spatial_dims) if channels_last else None
    if layout is not None:
        model.to(memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack memory_format
    _check_batch(stage, sc, 1 if replicated else ctx.d.world)
    ts = _start(ctx, stage, model, loss_fn, sc, betas, extra_opt, rng)
    wrapped = loss_fn if replicated else _wrap(ctx, loss_fn)
    source = batches(ts.step) if batches is not None else iter(_loader(ctx, sc, seed, ts.step))
    progress = Progress(stage, sc.steps, ts.step, ctx.d.main, sc.log_every, ctx.clock, bar=ctx.bars)
    model.train()
    t0 = time.perf_counter()
    while ts.step < sc.steps:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(source).items()}
        if layout is not None:
            batch["image"] = batch["image"].contiguous(memory_format=layout)
        logs = _step(ctx, ts, wrapped, batch, after_step)
        for k, v in logs.items():
            ts.sums[k] = ts.sums.get(k, 0.0) + v
        ts.count += 1
        progress.update(ts.step, logs)
        if ts.step % sc.log_every == 0 or ts.step == sc.steps:
            _log_row(ctx, stage, sc, ts, t0)
            t0 = time.perf_counter()
        if sc.checkpoint_every and ts.step % sc.checkpoint_every == 0 and ts.step < sc.steps:
            ctx.save_last(stage, ts)
        if ts.step % RELEASE_EVERY == 0:
            release_freed_memory()
    progress.close()
    release_freed_memory()
    _warn_skipped(ctx, stage, sc, ts)
    model.eval()
    trained = ts.ema.module if ts.ema is not None else model
    if layout is not None:
        trained.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above
    return trained


_LAYOUTS = {2: torch.channels_last, 3: torch.channels_last_3d}
"""The channels-last memory format of an image batch by spatial dimensions."""

RELEASE_EVERY = 500
"""Steps between hand-backs of the CPU heap's free pages (segcft.train.context.release_freed_memory):
often enough to bound a fragmented heap, rarely enough that re-faulting one step's working set
costs well under 1 % of the time."""

SKIP_WARN = 0.25
"""A stage that skipped more than this fraction of its updates (non-finite gradients or norms over
``grad_skip``) barely trained: a warning naming the setting."""


def _warn_skipped(ctx: StageContext, stage: str, sc: Any, ts: TrainState) -> None:
    """Print a warning when more than ``SKIP_WARN`` of the stage's updates were skipped."""
    counts, skipped = ts.stepper.counts, ts.stepper.skipped
    if not ctx.d.main or ts.step == 0 or skipped <= SKIP_WARN * ts.step:
        return
    key = "cft" if stage.startswith("cft-") else f"train.{stage}"
    print(
        f"warning: [{stage}] skipped {skipped} of {ts.step} updates ({counts['skipped_norm']} with a gradient norm "
        f">= {key}.grad_skip {sc.grad_skip:g}, {counts['skipped_nonfinite']} not finite): the stage barely trained; "
        f"see the grad_norm column of metrics.csv (a larger {key}.grad_skip, or 0, skips only non-finite updates)",
        flush=True,
    )


def _check_batch(stage: str, sc: Any, world: int) -> None:
    """Steps and batch size that the ranks can share."""
    if sc.steps < 1 or sc.batch_size < world:
        raise ConfigError(f"train.{stage}: steps must be >= 1 and batch_size >= the number of ranks ({world})")
    if sc.batch_size % world:
        raise ConfigError(f"train.{stage}.batch_size {sc.batch_size} is not divisible by the {world} ranks")


def _start(
    ctx: StageContext,
    stage: str,
    model: nn.Module,
    loss_fn: nn.Module,
    sc: Any,
    betas: tuple[float, float],
    extra_opt: torch.optim.Optimizer | None,
    rng: torch.Generator | None,
) -> TrainState:
    """Optimiser, schedule, EMA and stepper of a stage, at step 0 or restored from its resume
    state (its metrics rows from then on are dropped: they are logged again)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if ctx.d.main:
        print(f"[{stage}] {type(model).__name__}: {sum(p.numel() for p in params):,} trainable parameters", flush=True)
    decay = sc.steps if sc.lr_decay == "cosine" else 0
    opt, sched = build_optimizer(
        params, lr=sc.lr, weight_decay=sc.weight_decay, warmup=sc.warmup, betas=betas, decay_steps=decay
    )
    ema = EMA(model, sc.ema) if sc.ema > 0 else None
    stepper = GuardedStepper(params, opt, sched, sc.grad_clip, sc.grad_skip, ema, model)
    ts = TrainState(model, loss_fn, opt, sched, stepper, ema, extra_opt, rng)
    last = ctx.run.last(stage)
    if ctx.resume and last.is_file():
        restore_state(ts, last, stage, ctx.d)
        ctx.metrics.drop_stage(stage, ts.step + 1)
        if ctx.d.main:
            print(f"[{stage}] resuming from {last} at step {ts.step}", flush=True)
    else:
        ctx.metrics.drop_stage(stage)
    return ts


def _wrap(ctx: StageContext, loss_fn: nn.Module) -> nn.Module:
    """``loss_fn`` under DDP when several ranks run."""
    if not ctx.d.enabled:
        return loss_fn
    # a plugin may hold parameters that a loss leaves unused (the HVAE's last prior projection):
    # they keep no gradient, as in one process. The set is the same every step, so a static graph
    # finds it once, not with a traversal of the autograd graph per step (find_unused_parameters)
    return nn.parallel.DistributedDataParallel(
        loss_fn,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        static_graph=True,
    )


def _loader(ctx: StageContext, sc: Any, seed: int, step: int) -> DataLoader:
    """This rank's batches from ``step`` on."""
    local_batch = sc.batch_size // ctx.d.world
    sampler = ResumableSampler(len(ctx.train_set), ctx.d, seed, offset=step * local_batch)
    cuda = ctx.device.type == "cuda"
    # The loader's own generator: creating its iterator draws a base seed, which must not
    # move the global RNG that a resume has just restored.
    return DataLoader(
        ctx.train_set,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=4 if cuda else 0,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(seed),
    )


def _step(
    ctx: StageContext,
    ts: TrainState,
    wrapped: nn.Module,
    batch: dict[str, torch.Tensor],
    after_step: Callable[[], None] | None,
) -> dict[str, float]:
    """One optimisation step; returns the loss terms and the gradient norm."""
    device = next(iter(batch.values())).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx.amp and device.type == ctx.device.type):
        out = wrapped(batch)
    out["loss"].backward()
    result = ts.stepper.step(out["loss"])
    if ts.extra_opt is not None:
        if not result.skipped:
            ts.extra_opt.step()
        ts.extra_opt.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    ts.step += 1
    logs = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
    logs["grad_norm"] = result.grad_norm
    return logs


def _log_row(ctx: StageContext, stage: str, sc: Any, ts: TrainState, t0: float) -> None:
    """One metrics row: the means since the last row, learning rate, skipped updates (count, and
    with the clipped ones as fractions of the steps so far), speed."""
    row = {k: v / ts.count for k, v in ts.sums.items()}
    counts, skipped = ts.stepper.counts, ts.stepper.skipped
    row.update(
        lr=ts.sched.get_last_lr()[0],
        skipped=float(skipped),
        skipped_frac=skipped / max(ts.step, 1),
        clipped_frac=counts["clipped"] / max(ts.step, 1),
        samples_per_s=ts.count * sc.batch_size / max(time.perf_counter() - t0, 1e-9),
    )
    ctx.metrics.log(stage, ts.step, row)
    ts.sums, ts.count = {}, 0
