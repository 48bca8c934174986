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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["64", "192", "3d"], choices=["64", "192", "3d"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("step.csv"))
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
