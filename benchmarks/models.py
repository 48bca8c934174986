"""Training throughput and peak memory of every built-in model on this CPU.

For each model (hvae, unet, cnn, mechanisms) at the default 2D (cxr-phantom 64 x 64) and 3D
(ccta-phantom 64 x 32 x 32) sizes, with the model's default config: AdamW training steps on one
fixed phantom batch (data loading excluded). Each measurement runs in a fresh process so the
peak resident memory belongs to that model alone.

Run: python benchmarks/models.py [--models hvae,unet,cnn,mechanisms] [--dims 2,3] [--steps 10]
     [--threads 1] [--batch-2d 16] [--batch-3d 4] [--batch-mechanisms 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MODELS = ("hvae", "unet", "cnn", "mechanisms")


def _rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dataset(dims: int) -> Any:
    if dims == 2:
        from segcft.data import cxr_phantom

        return cxr_phantom.build(None, "train")
    from segcft.data import ccta_phantom

    return ccta_phantom.build(None, "train")


def _setup(model: str, dims: int, batch: int) -> tuple[Any, Callable[[], Any], float]:
    """(module, loss closure, RSS in MiB once the data is ready) for one model on a fixed
    phantom batch; the RSS is the baseline the peak is measured against."""
    import torch

    from segcft.models import configs

    ds = _dataset(dims)
    info = ds.info
    if model == "mechanisms":
        rows = torch.stack([ds[i]["parents"] for i in range(min(len(ds), 64))])
        data = rows[torch.randint(len(rows), (batch,), generator=torch.Generator().manual_seed(0))]
    else:
        items = [ds[i] for i in range(batch)]
        image = torch.stack([it["image"] for it in items])
        mask = torch.stack([it["mask"] for it in items])
        parents = torch.stack([it["parents"] for it in items])
    base = _rss_mib()
    torch.manual_seed(0)
    if model == "hvae":
        from segcft.models import hvae

        net = hvae.build(configs.HVAEConfig(preset="64" if dims == 2 else "3d"), info)
        return net, lambda: net.elbo(image, parents)["loss"], base
    if model == "unet":
        from segcft.models import unet

        net = unet.build(configs.UNetConfig(), info)
        return net, lambda: unet.segmentation_loss(net(image), mask), base
    if model == "cnn":
        from segcft.models import regressor

        net = regressor.build(configs.CNNRegressorConfig(), info)
        return net, lambda: net.nll(image, parents).sum(1).mean(), base
    from segcft.models.mechanisms import ParentSCM

    net = ParentSCM(info, configs.MechanismsConfig())
    return net, lambda: -net.log_prob(data).mean(), base


def measure(model: str, dims: int, batch: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Run in this process: samples per wall second and per CPU second, and the growth of the
    peak resident memory over the process once the data is loaded (model, optimiser,
    activations and gradients)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    net, loss_fn, base = _setup(model, dims, batch)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "model": model,
        "dims": dims,
        "batch": batch,
        "params": sum(p.numel() for p in net.parameters()),
        "threads": torch.get_num_threads(),
        "samples_per_s": batch * steps / wall,
        "samples_per_cpu_s": batch * steps / cpu,
        "peak_mib": _peak_rss_mib() - base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--dims", default="2,3", help="2, 3 or 2,3")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--batch-2d", type=int, default=16)
    parser.add_argument("--batch-3d", type=int, default=4)
    parser.add_argument("--batch-mechanisms", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DIMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    def batch_of(model: str, dims: int) -> int:
        if model == "mechanisms":
            return args.batch_mechanisms
        return args.batch_2d if dims == 2 else args.batch_3d

    if args.one:
        model, dims = args.one[0], int(args.one[1])
        print(json.dumps(measure(model, dims, batch_of(model, dims), args.steps, args.warmup, args.threads)))
        return
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected a subset of {list(MODELS)}")
    print(
        f"{'model':<11} {'dims':>4} {'batch':>5} {'params':>10} {'samples/s':>10} {'samples/CPU-s':>13} {'peak MiB':>9}"
    )
    for model in models:
        for dims in (int(d) for d in args.dims.split(",")):
            cmd = [sys.executable, __file__, "--one", model, str(dims), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--batch-2d", str(args.batch_2d),
                   "--batch-3d", str(args.batch_3d), "--batch-mechanisms", str(args.batch_mechanisms)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{model:<11} {dims:>4}  failed: {last}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{model:<11} {dims:>4} {r['batch']:>5} {r['params']:>10,} {r['samples_per_s']:>10.1f} "
                  f"{r['samples_per_cpu_s']:>13.1f} {r['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
