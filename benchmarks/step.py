"""One counterfactual fine-tuning step: samples/s and peak memory for Reg-CFT, Seg-CFT with the
fused ``area_loss`` op and Seg-CFT with the pure-torch reference soft area.

    python benchmarks/step.py [--shapes 64 192 3d] [--batch 8] [--reps 5] [--device cpu|cuda]

Components are the built-in plugins at their default sizes (generator preset "64", "192" or
"3d"), with random weights: the cost of a step does not depend on training. Peak memory is
CUDA's max_memory_allocated on a GPU and the growth of the process's max RSS on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from segcft.cft import CFTObjective
from segcft.data.variables import DatasetInfo
from segcft.dscm import DSCM, permutation_intervention
from segcft.plugins import get_registry


def _build(kind: str, name: str, info: DatasetInfo, **params: object) -> torch.nn.Module:
    entry = get_registry().get(kind, name)
    cfg = entry.config(**params)
    return entry.load()(cfg, info)


def _setup(shape: str, device: torch.device):
    reg = get_registry()
    if shape == "3d":
        ds_entry = reg.get("dataset", "ccta-phantom")
        ds = ds_entry.load()(ds_entry.config(), "train")
        preset = "3d"
    else:
        ds_entry = reg.get("dataset", "cxr-phantom")
        ds = ds_entry.load()(ds_entry.config(size=int(shape)), "train")
        preset = shape
    info = ds.info
    from segcft.models.mechanisms import ParentSCM

    torch.manual_seed(0)
    gen = _build("generator", "hvae", info, preset=preset).to(device)
    seg = _build("segmentor", "unet", info).to(device)
    regressor = _build("regressor", "cnn", info).to(device)
    dscm = DSCM(info, ParentSCM(info).to(device).eval().requires_grad_(False), gen)
    return ds, info, dscm, seg, regressor


def _cfg() -> SimpleNamespace:
    return SimpleNamespace(lr_lagrange=1e-2, damping=100.0, lambda_init=0.0, penalty="l1", huber_delta=1.0,
                           soft_labels=False, seg_weight=1.0, reg_weight=1.0)


def _peak_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_mb(device: torch.device, start: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024


def bench(shape: str, variant: str, batch: int, reps: int, device: torch.device) -> dict[str, object]:
    ds, info, dscm, seg, regressor = _setup(shape, device)
    mode = "reg" if variant == "reg" else ("pos-seg" if shape == "3d" else "seg")
    obj = CFTObjective(mode, info, _cfg(), eps=1.0, segmentor=seg, regressor=regressor).to(device)
    if variant == "seg-reference":
        import segcft.ops as ops
        from segcft.ops import reference

        ops_area_loss = ops.area_loss
        ops.area_loss = reference.area_loss
    items = [ds[i] for i in range(batch)]
    b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    opt = torch.optim.AdamW(dscm.generator.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    do = permutation_intervention(info, b["parents"], g)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = obj(dscm, b, intervention=do)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()  # warm-up
    start = _peak_reset(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    if variant == "seg-reference":
        ops.area_loss = ops_area_loss
    return {"shape": shape, "variant": variant, "batch": batch, "device": device.type,
            "step_s": round(dt, 4), "samples_per_s": round(batch / dt, 2), "peak_mb": round(_peak_mb(device, start), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["64", "192", "3d"])
    p.add_argument("--variants", nargs="+", default=["reg", "seg-fused", "seg-reference"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("step.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        for variant in args.variants:
            row = bench(shape, variant, args.batch, args.reps, device)
            print(row, flush=True)
            rows.append(row)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
