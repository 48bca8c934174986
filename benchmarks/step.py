"""One counterfactual fine-tuning step: samples/s and peak memory for Reg-CFT, Seg-CFT with the
fused ``area_loss`` op and Seg-CFT with the pure-torch reference (``segcft.ops.reference``).

    python benchmarks/step.py [--shapes 64 192 3d] [--batch 8] [--reps 5] [--threads 1] [--device cpu|cuda]

A step is what the training pipeline runs: a permutation intervention, one posterior pass for
the real batch's nelbo and the abduction, the decode under the counterfactual parents, the
frozen guide, backward through everything, an AdamW step. Components are the built-in plugins
at their default sizes (generator preset "64", "192" or "3d"; the 3D seg variants are pos-seg,
with regions) with random weights: the cost of a step does not depend on training. Every
(shape, variant) runs in a fresh process, so that peak memory is its own: CUDA's
max_memory_allocated on a GPU, the growth of the process's max RSS over the set-up on a CPU.
Samples per CPU second (one thread) is the figure to compare on a shared machine.

    python benchmarks/step.py --routes --shapes 64 --reps 20 --threads 1

times the Seg-CFT step with the ops called through the eager autograd.Function twin and through
the custom ops `torch.ops.segcft.*`, alternating the two step by step (A B B A ...) in one
process, then the area-loss op alone (forward+backward) both ways on a tiny and on the step's
input; prints medians, and the paired difference op - twin with its p20-p80.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

VARIANTS = ("reg", "seg-fused", "seg-reference")


def _build(kind: str, name: str, info: Any, **params: object) -> torch.nn.Module:
    from segcft.plugins import get_registry

    entry = get_registry().get(kind, name)
    return entry.load()(entry.config(**params), info)


def _setup(shape: str, device: torch.device) -> tuple[Any, Any, Any, torch.nn.Module, torch.nn.Module]:
    from segcft.dscm import DSCM
    from segcft.models.mechanisms import ParentSCM
    from segcft.plugins import get_registry

    reg = get_registry()
    if shape == "3d":
        entry, preset = reg.get("dataset", "ccta-phantom"), "3d"
        ds = entry.load()(entry.config(), "train")
    else:
        entry, preset = reg.get("dataset", "cxr-phantom"), shape
        ds = entry.load()(entry.config(size=int(shape)), "train")
    info = ds.info
    torch.manual_seed(0)
    gen = _build("generator", "hvae", info, preset=preset).to(device)
    seg = _build("segmentor", "unet", info).to(device)
    regressor = _build("regressor", "cnn", info).to(device)
    dscm = DSCM(info, ParentSCM(info).to(device).eval().requires_grad_(False), gen)
    return ds, info, dscm, seg, regressor


def _cft_config() -> SimpleNamespace:
    return SimpleNamespace(lr_lagrange=1e-2, damping=100.0, lambda_init=0.0, penalty="l1", huber_delta=1.0,
                           soft_labels=False, seg_weight=1.0, reg_weight=1.0)


def bench(shape: str, variant: str, batch: int, reps: int, device: torch.device) -> dict[str, object]:
    """Time ``reps`` fine-tuning steps after one warm-up step, in this process."""
    from segcft.cft import CFTObjective
    from segcft.dscm import permutation_intervention

    if variant == "seg-reference":
        import segcft.ops as ops
        from segcft.ops import reference

        ops.area_loss = reference.area_loss  # this process only runs this variant
    ds, info, dscm, seg, regressor = _setup(shape, device)
    mode = "reg" if variant == "reg" else ("pos-seg" if shape == "3d" else "seg")
    obj = CFTObjective(mode, info, _cft_config(), eps=1.0, segmentor=seg, regressor=regressor).to(device)
    items = ds.__getitems__(list(range(batch)))
    b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    opt = torch.optim.AdamW(dscm.generator.parameters(), lr=1e-4)
    do = permutation_intervention(info, b["parents"], torch.Generator().manual_seed(0),
                                  [v.name for v in info.structure_variables])

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = obj(dscm, b, intervention=do)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = (time.perf_counter() - t0) / reps, (time.process_time() - c0) / reps
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024)
    return {"shape": shape, "variant": variant, "mode": mode, "batch": batch, "device": device.type,
            "threads": torch.get_num_threads(), "step_s": round(wall, 4), "samples_per_s": round(batch / wall, 2),
            "samples_per_cpu_s": round(batch / cpu, 2) if device.type == "cpu" else "",
            "peak_mb": round(peak, 1)}


def _set_route(route: str) -> None:
    """Forces the eager calls of segcft.ops through the custom ops ("op") or leaves them on the
    autograd.Function twin ("twin"); this process only."""
    from segcft.ops import _custom

    if not hasattr(_custom, "_eager_ok"):
        _custom._eager_ok = _custom.eager_ok  # type: ignore[attr-defined]
    _custom.eager_ok = _custom._eager_ok if route == "twin" else (lambda *tensors: False)  # type: ignore[attr-defined]


def _paired(fn: Any, pairs: int) -> dict[str, float]:
    """CPU seconds of fn() per route, routes alternated A B B A ...: medians and the paired
    difference (op - twin) in % of the twin's median (median, mean, p20, p80); minima."""
    times: dict[str, list[float]] = {"twin": [], "op": []}
    for i in range(pairs):
        for route in (("twin", "op") if i % 2 == 0 else ("op", "twin")):
            _set_route(route)
            c0 = time.process_time()
            fn()
            times[route].append(time.process_time() - c0)
    _set_route("twin")
    twin, op = torch.tensor(times["twin"]), torch.tensor(times["op"])
    base = float(twin.median())
    diff = (op - twin) / base * 100
    return {"twin_ms": round(base * 1e3, 4), "op_ms": round(float(op.median()) * 1e3, 4),
            "twin_min_ms": round(float(twin.min()) * 1e3, 4), "op_min_ms": round(float(op.min()) * 1e3, 4),
            "diff_mean_pct": round(float(diff.mean()), 3),
            "diff_pct": round(float(diff.median()), 3), "diff_p20": round(float(diff.quantile(0.2)), 3),
            "diff_p80": round(float(diff.quantile(0.8)), 3), "pairs": pairs}


def bench_routes(shape: str, batch: int, reps: int) -> list[dict[str, object]]:
    """The Seg-CFT step and the area-loss op alone, twin vs custom op, on the CPU."""
    from segcft.cft import CFTObjective
    from segcft.dscm import permutation_intervention
    from segcft.ops import area_loss

    device = torch.device("cpu")
    ds, info, dscm, seg, regressor = _setup(shape, device)
    mode = "pos-seg" if shape == "3d" else "seg"
    obj = CFTObjective(mode, info, _cft_config(), eps=1.0, segmentor=seg, regressor=regressor)
    items = ds.__getitems__(list(range(batch)))
    b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    opt = torch.optim.AdamW(dscm.generator.parameters(), lr=1e-4)
    do = permutation_intervention(info, b["parents"], torch.Generator().manual_seed(0),
                                  [v.name for v in info.structure_variables])
    calls: list[tuple] = []
    real_area_loss = area_loss

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not calls:
            calls.append((args, kwargs))
        return real_area_loss(*args, **kwargs)

    import segcft.ops as ops

    ops.area_loss = spy  # type: ignore[assignment]

    def step() -> None:
        out = obj(dscm, b, intervention=do)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()
    ops.area_loss = real_area_loss  # type: ignore[assignment]
    step()
    _set_route("op")
    step()
    rows: list[dict[str, object]] = [{"what": f"step {shape} {mode} batch {batch}", **_paired(step, reps)}]
    args, kwargs = calls[0]
    logits = args[0].detach()
    tiny = (torch.randn(2, logits.shape[1], 8, 8),) + tuple(a.detach()[:2] if a.dim() and a.shape[0] == logits.shape[0]
                                                             else a for a in args[1:5])
    tiny_kwargs = dict(kwargs, regions=None, num_regions=0) if kwargs.get("regions") is None else None
    cases = [("area_loss fwd+bwd " + "x".join(map(str, logits.shape)), logits, args[1:], kwargs)]
    if tiny_kwargs is not None:
        cases.insert(0, ("area_loss fwd+bwd " + "x".join(map(str, tiny[0].shape)), tiny[0], tiny[1:], tiny_kwargs))
    for what, x0, rest, kw in cases:
        def op_alone(x0: torch.Tensor = x0, rest: tuple = rest, kw: dict = kw) -> None:
            for _ in range(20):
                x = x0.detach().requires_grad_()
                area_loss(x, *rest, **kw).backward()

        rows.append({"what": what + " (20 calls)", **_paired(op_alone, reps * 5)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["64", "192", "3d"], choices=["64", "192", "3d"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("step.csv"))
    p.add_argument("--routes", action="store_true", help="Seg-CFT step, eager twin vs custom ops (CPU)")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.routes:
        for shape in args.shapes:
            for row in bench_routes(shape, args.batch, args.reps):
                print(json.dumps(row), flush=True)
        return 0
    if args.one:
        print(json.dumps(bench(args.one[0], args.one[1], args.batch, args.reps, torch.device(args.device))))
        return 0
    rows = []
    for shape in args.shapes:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", shape, variant, "--batch", str(args.batch), "--reps",
                   str(args.reps), "--threads", str(args.threads), "--device", args.device]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
