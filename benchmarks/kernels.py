"""Kernel benchmark: soft area + L1 area loss, forward / backward / forward+backward.

Providers: eager PyTorch (softmax, sum, loss), torch.compile of the same function, and the
segcft ops. Reports median, p20 and p80 milliseconds beside the memory-traffic floor at the
machine's measured copy bandwidth (forward: one read of the logits and region map; backward: one
read plus one write of the logits' size), and the peak extra memory of forward+backward.
Prints a table and appends CSV rows to benchmarks/results.csv.

    python benchmarks/kernels.py            # all cases, CPU (or --device cuda)
    python benchmarks/kernels.py --quick    # fewer repetitions, 2D cases only
    python benchmarks/kernels.py --cases 2d-16x4x192x192 --regions no   # a subset
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from segcft import ops

CASES = {
    "2d-16x4x192x192": (16, 4, 192, 192),
    "3d-2x4x96x96x96": (2, 4, 96, 96, 96),
    "3d-2x4x64x128x128": (2, 4, 64, 128, 128),
}
NUM_REGIONS = 3
ROTATE_BYTES = 96 * 2**20  # input buffers cycled per case, so caches hold none of them


def eager_loss(logits, regions, targets, scale):
    """The plain PyTorch formulation: softmax, (regional) sums, L1 loss."""
    p = torch.softmax(logits.float(), dim=1)
    b, c = p.shape[:2]
    flat = p.reshape(b, c, -1)
    if regions is None:
        areas = flat.sum(-1)
    else:
        ids = regions.reshape(b, 1, -1).expand(b, c, flat.shape[-1])
        areas = flat.new_zeros(b, c, NUM_REGIONS).scatter_add(2, ids, flat).reshape(b, -1)
    return ((areas - targets) / scale).abs().sum() / b


def segcft_loss(logits, regions, targets, scale):
    """The same loss through the fused segcft op."""
    c = logits.shape[1]
    if regions is None:
        index = torch.stack([torch.arange(c), torch.full((c,), -1)], 1)
    else:
        index = torch.cartesian_prod(torch.arange(c), torch.arange(NUM_REGIONS))
    index = index.to(logits.device)
    weights = torch.ones_like(targets)
    return ops.area_loss(logits, targets, weights, index, scale, "l1", 1.0, "softmax", regions,
                         NUM_REGIONS if regions is not None else 0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[int], None], reps: int, device: str) -> list[float]:
    """Milliseconds of fn(i) for i in range(reps), after two warm-up calls."""
    for i in range(2):
        fn(i)
    sync(device)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device: str, reps: int) -> float:
    """Bytes per second of read+write traffic in the fastest of several large tensor copies."""
    n = 64 * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = min(timed(lambda i: dst.copy_(src), reps, device))  # best case: the achievable rate
    return 2 * src.numel() * 4 / (ms / 1e3)


def peak_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory allocated above the starting point while fn runs, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler._memory_profiler import Action

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2**20


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_case(name, shape, with_regions, device, reps, providers):
    nbuf = max(2, math.ceil(ROTATE_BYTES / (math.prod(shape) * 4)))
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = [(torch.randn(shape, generator=gen) * 3).to(device) for _ in range(nbuf)]
    b, c = shape[:2]
    regions = None
    if with_regions:
        regions = (torch.arange(shape[-1]) * NUM_REGIONS // shape[-1]).expand(b, *shape[2:]).contiguous().to(device)
    k = c * (NUM_REGIONS if with_regions else 1)
    vox = math.prod(shape[2:])
    targets = torch.rand(b, k, generator=gen).to(device) * vox / k
    scale = torch.full((k,), vox / k, device=device)
    logit_bytes = math.prod(shape) * 4
    region_bytes = regions.numel() * 8 if regions is not None else 0
    floor_bytes = {"fwd": logit_bytes + region_bytes, "bwd": 2 * logit_bytes + region_bytes}
    floor_bytes["fwd+bwd"] = floor_bytes["fwd"] + floor_bytes["bwd"]
    results = []
    for provider, fn in providers.items():
        leaves = [x.clone().requires_grad_() for x in logits]

        def fwd(i, fn=fn, leaves=leaves):
            with torch.no_grad():
                fn(leaves[i % nbuf], regions, targets, scale)

        def fwd_bwd(i, fn=fn, leaves=leaves):
            leaves[i % nbuf].grad = None
            fn(leaves[i % nbuf], regions, targets, scale).backward()

        graphs = [fn(x, regions, targets, scale) for x in leaves]

        def bwd(i, graphs=graphs, leaves=leaves):
            leaves[i % nbuf].grad = None
            graphs[i % nbuf].backward(retain_graph=True)

        row = {}
        for mode, call in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
            t = sorted(timed(call, reps, device))
            q = statistics.quantiles(t, n=5) if len(t) >= 5 else [t[0]] * 4
            row[mode] = (statistics.median(t), q[0], q[3])
        del graphs
        mb = peak_memory_mb(lambda: fwd_bwd(0), device)
        results.append((provider, row, mb))
    return results, floor_bytes, logit_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per mode (default 30, --quick 7)")
    parser.add_argument("--quick", action="store_true", help="2D cases only, fewer repetitions")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                        help="cases to run (default: all; --quick: the 2D cases)")
    parser.add_argument("--regions", choices=("both", "no", "yes"), default="both",
                        help="run each case without a region map, with one, or both (default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) for every provider (the segcft kernels use as many)")
    parser.add_argument("--csv", type=Path, default=Path(__file__).parent / "results.csv")
    args = parser.parse_args()
    reps = args.reps or (7 if args.quick else 30)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    providers: dict[str, Callable] = {"eager": eager_loss}
    if not args.no_compile:
        providers["compile"] = torch.compile(eager_loss, dynamic=False)
    providers["segcft"] = segcft_loss

    bw = copy_bandwidth(device, max(reps, 10))
    backend = ops.cpu_backend() if device == "cpu" else ops.cuda_backend()
    versions = f"torch {torch.__version__}; segcft backend {backend.name}"
    dev = device_name(device)
    sha = git_sha()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"device: {dev}; {versions}; copy bandwidth {bw / 1e9:.1f} GB/s; reps {reps}; git {sha}")
    header = f"{'case':<24}{'provider':<9}{'mode':<9}{'median ms':>10}{'p20':>9}{'p80':>9}{'floor ms':>10}{'x floor':>8}{'peak MB':>9}"
    print(header)
    rows = []
    cases = {k: v for k, v in CASES.items()
             if (k in args.cases if args.cases else not args.quick or k.startswith("2d"))}
    region_modes = {"both": (False, True), "no": (False,), "yes": (True,)}[args.regions]
    for name, shape in cases.items():
        for with_regions in region_modes:
            case = name + ("+regions" if with_regions else "")
            results, floor_bytes, logit_bytes = run_case(case, shape, with_regions, device, reps, providers)
            for provider, row, mb in results:
                for mode, (med, p20, p80) in row.items():
                    floor_ms = floor_bytes[mode] / bw * 1e3
                    mem = f"{mb:9.1f}" if mode == "fwd+bwd" else " " * 9
                    print(f"{case:<24}{provider:<9}{mode:<9}{med:10.2f}{p20:9.2f}{p80:9.2f}{floor_ms:10.2f}"
                          f"{med / floor_ms:8.2f}{mem}")
                    rows.append([stamp, provider, case, mode, f"{med:.4f}", f"{p20:.4f}", f"{p80:.4f}",
                                 f"{floor_ms:.4f}", f"{mb:.1f}" if mode == "fwd+bwd" else "", dev, versions, sha])
            eager_ms = next(r for p, r, _ in results if p == "eager")["fwd+bwd"][0]
            ours_ms = next(r for p, r, _ in results if p == "segcft")["fwd+bwd"][0]
            print(f"{case:<24}segcft fwd+bwd speed-up over eager: {eager_ms / ours_ms:.1f}x; "
                  f"probability tensor {logit_bytes / 2**20:.1f} MB")

    new = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "provider", "case", "mode", "ms", "p20_ms", "p80_ms", "floor_ms", "MB",
                        "device", "versions", "git_sha"])
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
