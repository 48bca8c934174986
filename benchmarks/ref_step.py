"""One generator training step of segcft's HVAE side by side with the reference implementation's
HVAE (causal-gen ``src/vae.py``, pure PyTorch) at the same configuration.

    sh benchmarks/get_reference.sh /tmp/causal-gen        # once, needs network
    OMP_NUM_THREADS=1 python benchmarks/ref_step.py --reference /tmp/causal-gen [--shapes 64 3d]
        [--reps 20] [--threads 1] [--no-profile]

A step is: forward (posterior + prior + likelihood -> per-pixel nelbo), backward, AdamW step,
``zero_grad``. Both models get the same batch of phantom images and parents, AdamW(lr 1e-3,
betas (0.9, 0.9), weight decay 0.1) as each builds it (segcft: ``segcft.optim.build_optimizer``;
causal-gen: its train_setup's) and the same thread count. segcft runs as its
generator stage trains it (2D: channels_last model and images). The reference is configured from
segcft's preset: the causal-gen architecture strings ``enc_arch``/``dec_arch`` with the same
per-resolution block counts (causal-gen's ``rXbNdK`` stage adds one down-sampling block, where
segcft has a 1x1 convolution after an average pool), the same widths, ``z_dim``,
``z_max_res``, ``bias_max_res``, bottleneck factor, bottleneck (GELU) blocks, an exogenous prior
(``cond_prior`` off) and ``context_dim`` = number of parents, the parents tiled to the image size
outside the timed step (as its trainer does before the model). causal-gen is 2D only (Conv2d,
square resolutions), so for the 3D preset segcft is reported alone.

Timing: both models live in this process and their reps are interleaved (segcft, reference,
segcft, ...) after warm-up, so that load on a shared machine hits both alike; the figure is the
median and the spread is the inter-quartile range; with one thread the median CPU time of
that thread (``*_cpu_ms``, ``speedup_cpu``) is also given, which other jobs on the machine
barely move. The process runs under segcft's CPU malloc setting (freed memory kept in glibc's
heap, ``segcft.train.context.keep_freed_memory``), so neither model pays page faults for
re-allocating its activations; ``MALLOC_MMAP_MAX_=65536`` gives both glibc's defaults, under
which the reference's step faults about three times as many pages as segcft's. Peak memory is
the growth of the peak RSS (VmHWM, reset after set-up) over set-up in a fresh subprocess per
variant. The profile (torch.profiler, one step each) groups
self CPU time into convolutions (forward and backward), normalisation, KL terms (forward),
likelihood (forward), optimizer, other ops (elementwise, backward glue) and Python overhead
(wall time not inside any op). The last line is the 2D speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parent.parent
BATCH = {"64": 16, "3d": 4}  # the quick preset's generator batch sizes
GROUPS = ("convolution", "normalisation", "kl", "likelihood", "optimizer", "other ops", "python overhead")


def _data(shape: str, batch: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The dataset info and a fixed batch (images, parents) of the phantom for ``shape``."""
    sys.path.insert(0, str(REPO))
    from segcft.plugins import get_registry

    reg = get_registry()
    if shape == "3d":
        entry = reg.get("dataset", "ccta-phantom")
        ds = entry.load()(entry.config(), "train")
    else:
        entry = reg.get("dataset", "cxr-phantom")
        ds = entry.load()(entry.config(size=int(shape)), "train")
    items = ds.__getitems__(list(range(batch)))
    return ds.info, torch.stack([it["image"] for it in items]), torch.stack([it["parents"] for it in items])


class Variant:
    """A model, its batch and one training step, with named ranges for the profile."""

    def __init__(
        self, name: str, model: torch.nn.Module, loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer
    ) -> None:
        self.name, self.model, self.loss, self.opt = name, model, loss, opt

    def step(self) -> float:
        with record_function("forward"):
            loss = self.loss()
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


@contextlib.contextmanager
def _ranged(module: Any, names: dict[str, str]) -> Iterator[None]:
    """Wrap ``module.<fn>`` in a profiler range named ``names[fn]`` for the duration."""
    saved = {fn: getattr(module, fn) for fn in names}

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def inner(*args: Any, **kw: Any) -> Any:
            with record_function(label):
                return fn(*args, **kw)

        return inner

    for fn, label in names.items():
        setattr(module, fn, wrap(saved[fn], label))
    try:
        yield
    finally:
        for fn, f in saved.items():
            setattr(module, fn, f)


def segcft_variant(shape: str, batch: int) -> Variant:
    from segcft.models.hvae import HVAE, HVAEConfig

    info, x, pa = _data(shape, batch)
    torch.manual_seed(0)
    model = HVAE(HVAEConfig(preset="64" if shape != "3d" else "3d"), tuple(info.shape), len(info.variables))
    if info.spatial_dims == 2:  # as the generator stage trains it (segcft.train.loop.fit)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    from segcft.optim import build_optimizer

    opt, _ = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.9))
    return Variant("segcft", model, lambda: model.elbo(x, pa)["loss"], opt)


def reference_args(shape: str, num_parents: int) -> SimpleNamespace:
    """causal-gen hyper-parameters equal to segcft's preset for a 2D ``shape``."""
    from segcft.models.hvae import HVAEConfig, plan_stages, resolve_config

    size = int(shape)
    cfg = resolve_config(HVAEConfig(preset="auto"), (size, size))
    stages = plan_stages(cfg, (size, size))
    enc = []
    for i, s in enumerate(stages):
        down = f"d{cfg.pool[i]}" if i < len(cfg.pool) else ""
        enc.append(f"{s.res}b{s.enc_blocks}{down}")
    dec = [f"{s.res}b{s.dec_blocks}" for s in reversed(stages)]
    return SimpleNamespace(
        hps="segcft-bench",  # neither "ukbb" (light blocks) nor "morphomnist" (conditioning dropout)
        input_res=size,
        input_channels=1,
        enc_arch=",".join(enc),
        dec_arch=",".join(dec),
        widths=list(cfg.widths),
        bottleneck=cfg.bottleneck,
        z_dim=cfg.z_dim,
        z_max_res=cfg.z_max_res,
        bias_max_res=cfg.bias_max_res,
        context_dim=num_parents,
        cond_prior=False,
        q_correction=False,
        x_like="diag_dgauss",
        std_init=cfg.std_init,
        kl_free_bits=0.0,
    )


def reference_variant(shape: str, batch: int, ref_dir: Path) -> tuple[Variant, SimpleNamespace]:
    _, x, pa = _data(shape, batch)
    sys.path.insert(0, str(ref_dir / "src"))
    import vae  # type: ignore[import-not-found]  # causal-gen's src/vae.py

    args = reference_args(shape, pa.shape[1])
    torch.manual_seed(0)
    model = vae.HVAE(args)
    model.train()
    pa_map = pa[..., None, None].repeat(1, 1, *(args.input_res,) * 2)  # causal-gen's preprocess_batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.9))  # its train_setup
    return Variant("reference", model, lambda: model(x, pa_map, beta=1.0)["elbo"], opt), args


def _profile(variant: Variant, module: Any, names: dict[str, str]) -> dict[str, float]:
    """ms per step in each of GROUPS, from one profiled step."""
    with _ranged(module, names), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        variant.step()
        wall = (time.perf_counter() - t0) * 1e3
    groups = dict.fromkeys(GROUPS, 0.0)
    for ev in prof.events():
        if ev.name in ("forward", "backward", "optimizer") or ev.name in names.values():
            continue
        ranges, parent = [], ev.cpu_parent
        while parent is not None:
            ranges.append(parent.name)
            parent = parent.cpu_parent
        name = ev.name.lower()
        if "conv" in name:
            group = "convolution"
        elif any(k in name for k in ("batch_norm", "layer_norm", "group_norm", "instance_norm")):
            group = "normalisation"
        elif "kl" in ranges:
            group = "kl"
        elif "likelihood" in ranges:
            group = "likelihood"
        elif "optimizer" in ranges:
            group = "optimizer"
        else:
            group = "other ops"
        groups[group] += ev.self_cpu_time_total / 1e3
    groups["python overhead"] = max(wall - sum(groups.values()), 0.0)
    return {k: round(v, 1) for k, v in groups.items()}


def _memory(shape: str, name: str, batch: int, ref_dir: Path | None, threads: int) -> float:
    """Max-RSS growth (MiB) of warm-up plus three steps in a fresh process."""
    cmd = [sys.executable, __file__, "--memory", shape, name, "--batch", str(batch), "--threads", str(threads)]
    if ref_dir is not None:
        cmd += ["--reference", str(ref_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _memory_child(shape: str, name: str, batch: int, ref_dir: Path | None) -> None:
    v = segcft_variant(shape, batch) if name == "segcft" else reference_variant(shape, batch, ref_dir)[0]
    gc.collect()
    try:  # reset the high-water mark left by building the phantom data (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        start, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:  # elsewhere: max RSS growth, a lower bound when set-up peaked higher
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    for _ in range(4):
        v.step()
    print(json.dumps({"peak_mb": (peak() - start) / 1024}))


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing, memory and profile of every variant for one shape."""
    import segcft.models.hvae as hvae
    import segcft.models.hvae_blocks as blocks

    batch = args.batch or BATCH[shape]
    variants = [segcft_variant(shape, batch)]
    ranges: dict[str, tuple[Any, dict[str, str]]] = {"segcft": (blocks, {"gaussian_kl": "kl"})}
    ranges_extra = (hvae, {"discretised_gaussian_log_prob": "likelihood"})
    result: dict[str, Any] = {"shape": shape, "batch": batch, "threads": torch.get_num_threads()}
    if shape != "3d" and args.reference is not None:
        ref, ref_args = reference_variant(shape, batch, args.reference)
        variants.append(ref)
        result["reference_args"] = {k: v for k, v in vars(ref_args).items() if k != "hps"}
        import vae  # type: ignore[import-not-found]

        ranges["reference"] = (vae, {"gaussian_kl": "kl"})
        ranges_ref_extra = (vae.DGaussNet, {"nll": "likelihood"})
    for v in variants:
        result[f"{v.name}_params"] = sum(p.numel() for p in v.model.parameters())
        for _ in range(args.warmup):
            v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(args.reps):
        for v in variants:
            t0, c0 = time.perf_counter(), time.thread_time()
            v.step()
            times[v.name].append(time.perf_counter() - t0)
            cpu[v.name].append(time.thread_time() - c0)
    for v in variants:
        if torch.get_num_threads() == 1:  # the CPU time of the one thread: robust to other jobs
            result[f"{v.name}_cpu_ms"] = round(1e3 * statistics.median(cpu[v.name]), 1)
            result[f"{v.name}_cpu_min_ms"] = round(1e3 * min(cpu[v.name]), 1)
        t = sorted(times[v.name])
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        result[f"{v.name}_step_ms"] = round(1e3 * statistics.median(t), 1)
        result[f"{v.name}_iqr_ms"] = [round(1e3 * q[0], 1), round(1e3 * q[2], 1)]
        result[f"{v.name}_steps_per_s"] = round(1 / statistics.median(t), 2)
        if args.profile:
            module, names = ranges[v.name]
            extra_mod, extra_names = ranges_extra if v.name == "segcft" else ranges_ref_extra
            with _ranged(extra_mod, extra_names):
                result[f"{v.name}_profile_ms"] = _profile(v, module, names)
        if args.memory_check:
            ref_dir = args.reference if v.name == "reference" else None
            result[f"{v.name}_peak_mb"] = round(_memory(shape, v.name, batch, ref_dir, torch.get_num_threads()), 1)
    if "reference_step_ms" in result:
        result["speedup"] = round(result["reference_step_ms"] / result["segcft_step_ms"], 2)
        if "segcft_cpu_ms" in result:
            result["speedup_cpu"] = round(result["reference_cpu_ms"] / result["segcft_cpu_ms"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, help="a checkout of causal-gen (benchmarks/get_reference.sh)")
    p.add_argument("--shapes", nargs="+", default=["64", "3d"], choices=["64", "3d"])
    p.add_argument("--batch", type=int, default=0, help="0: the quick preset's (16 in 2D, 4 in 3D)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for both)")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-memory", dest="memory_check", action="store_false")
    p.add_argument("--memory", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from segcft.train.context import keep_freed_memory

    keep_freed_memory()  # as a segcft run sets malloc, for both models (MALLOC_MMAP_MAX_=65536: glibc's default)
    if args.reference is not None and not (args.reference / "src" / "vae.py").is_file():
        p.error(f"--reference {args.reference}: no src/vae.py there (run benchmarks/get_reference.sh DIR)")
    if args.memory:
        _memory_child(args.memory[0], args.memory[1], args.batch or BATCH[args.memory[0]], args.reference)
        return 0
    from segcft.ops._backend import backend_report

    print(f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {args.threads}; {backend_report()}", flush=True)
    speedup = None
    for shape in args.shapes:
        row = run_shape(shape, args)
        print(json.dumps(row), flush=True)
        if shape != "3d" and "speedup" in row:
            speedup = row["speedup"]
    if speedup is not None:
        print(f"generator step speed-up vs reference: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
