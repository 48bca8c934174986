"""Kernel benchmark: soft area and the fused area loss, forward / backward / forward+backward.

Providers: eager pure torch (the math of ``segcft.ops.reference``: raw_sums, variable_areas,
rho, without its input-value checks, which read back from the device on every call and break
torch.compile's graph), torch.compile of the same functions, and the segcft ops (the kernels).
Reports median, p20 and p80 milliseconds beside the memory-traffic floor at the device's
measured copy bandwidth (forward: one read of the logits and region map; backward: one read plus
one write of the logits' size), the achieved bandwidth as a percentage of the copy bandwidth,
and the peak extra memory of forward+backward. On a GPU each call is also measured by its GPU
time (the profiler's device events: kernels without the host's dispatch), and the targets are
judged on it. Prints a table, PASS/FAIL lines against the targets (segcft at least 3x eager, at
least as fast as torch.compile, at least 70 % of the copy bandwidth) and appends CSV rows to
benchmarks/results.csv (older files get the new columns).

    python benchmarks/kernels.py            # all default cases, CPU (or --device cuda)
    python benchmarks/kernels.py --quick    # fewer repetitions, 2D cases only
    python benchmarks/kernels.py --cases 2d-16x4x192x192 --regions no --ops area_loss   # a subset
    python benchmarks/kernels.py --cases 2d-2x3x16x16 3d-1x3x8x8x8 --reps 3   # any BxCxS... shape
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
from segcft.ops import reference

CASES = {
    "2d-16x4x192x192": (16, 4, 192, 192),
    "3d-2x4x96x96x96": (2, 4, 96, 96, 96),
    "3d-2x4x64x128x128": (2, 4, 64, 128, 128),
}
# Extra named cases for a GPU: the Seg-CFT step's guide output at 128x64x64, batch 8, and a
# volume far larger than any GPU cache (the bandwidth case).
GPU_CASES = {
    "3d-8x4x128x64x64": (8, 4, 128, 64, 64),
    "3d-2x4x128x256x256": (2, 4, 128, 256, 256),
}
OPS = ("area_loss", "soft_area")
NUM_REGIONS = 3
ROTATE_BYTES = 96 * 2**20  # input buffers cycled per case, so (CPU) caches hold none of them
TARGET_EAGER_X = 3.0
TARGET_COPY_PCT = 70.0
CSV_HEADER = ["time", "provider", "case", "mode", "ms", "p20_ms", "p80_ms", "floor_ms", "MB", "device", "versions",
              "git_sha", "op", "pct_copy_bw", "copy_GBps", "gpu_ms", "gpu_pct_copy_bw"]


def parse_case(name: str) -> tuple[int, ...]:
    """Shape of a named case, or of any ``2d-BxCxHxW`` / ``3d-BxCxDxHxW`` name."""
    if name in CASES or name in GPU_CASES:
        return {**CASES, **GPU_CASES}[name]
    try:
        nd, dims = name.split("-", 1)
        shape = tuple(int(s) for s in dims.split("x"))
    except ValueError:
        shape, nd = (), ""
    if nd not in ("2d", "3d") or len(shape) != int(nd[0]) + 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"case {name!r}: expected a known case or 2d-BxCxHxW / 3d-BxCxDxHxW")
    return shape


def loss_inputs(c: int, with_regions: bool, device: str) -> torch.Tensor:
    """The (class, region) index rows of the benchmark's loss: every class, whole or per region."""
    if with_regions:
        index = torch.cartesian_prod(torch.arange(c), torch.arange(NUM_REGIONS))
    else:
        index = torch.stack([torch.arange(c), torch.full((c,), -1)], 1)
    return index.to(device)


def reference_soft_area(logits, regions, num_regions):
    """segcft.ops.reference.soft_area at spacing 1 with softmax, without the value checks."""
    areas = reference.raw_sums(logits, regions, num_regions, "softmax")
    return areas if regions is not None else areas[..., 0]


def reference_area_loss(logits, targets, weights, index, scale, regions, num_regions):
    """segcft.ops.reference.area_loss at spacing 1 with softmax and l1, without the value checks."""
    areas = reference.raw_sums(logits, regions, num_regions, "softmax")
    u = (reference.variable_areas(areas, index) - targets) / scale
    return (weights * reference.rho(u, "l1")).sum(1).sum() / logits.shape[0]


def segcft_soft_area(logits, regions, num_regions):
    return ops.soft_area(logits, 1.0, "softmax", regions, num_regions)


def segcft_area_loss(logits, targets, weights, index, scale, regions, num_regions):
    return ops.area_loss(logits, targets, weights, index, scale, "l1", 1.0, "softmax", regions, num_regions)


def make_providers(op: str, compile_backend: str | None) -> dict[str, Callable]:
    """eager (the pure-torch reference), compile (torch.compile of it), segcft (the kernels),
    each as fn(logits, regions, aux) -> scalar to differentiate."""

    def wrap(impl: Callable) -> Callable:
        if op == "soft_area":

            def areas(logits, regions, aux):
                return (impl(logits, regions, NUM_REGIONS if regions is not None else 0) * aux["w"]).sum()

            return areas

        def loss(logits, regions, aux):
            return impl(logits, aux["targets"], aux["weights"], aux["index"], aux["scale"], regions,
                        NUM_REGIONS if regions is not None else 0)

        return loss

    torch._dynamo.reset()  # each case compiles afresh: no recompile limit falls back to eager
    ref = reference_soft_area if op == "soft_area" else reference_area_loss
    providers: dict[str, Callable] = {"eager": wrap(ref)}
    if compile_backend:
        providers["compile"] = wrap(torch.compile(ref, dynamic=False, backend=compile_backend))
    providers["segcft"] = wrap(segcft_soft_area if op == "soft_area" else segcft_area_loss)
    return providers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[int], None], reps: int, device: str) -> list[float]:
    """Milliseconds of fn(i) for i in range(reps), after two warm-up calls (CUDA events on a GPU)."""
    for i in range(2):
        fn(i)
    sync(device)
    times = []
    for i in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def gpu_ms(fn: Callable[[int], None], reps: int) -> float | None:
    """Milliseconds of GPU activity (kernels, copies, memsets) per fn(i), summed from the profiler's
    device events: what the kernels cost without the host's launch and dispatch overhead, which
    dominates the call time of small cases. None where the profiler records no device activity."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            fn(i)
        torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return us / 1e3 / reps if us > 0 else None


def copy_bandwidth(device: str, reps: int, mib: int) -> float:
    """Bytes per second of read+write traffic in the fastest of several large tensor copies."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = min(timed(lambda i: dst.copy_(src), reps, device))  # best case: the achievable rate
    return 2 * src.numel() * 4 / (ms / 1e3)


def peak_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory allocated above the starting point while fn runs, in MiB."""
    if device.startswith("cuda"):
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
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def case_inputs(shape, with_regions, device, rotate_bytes=ROTATE_BYTES):
    """Rotating logits buffers, the region map and the providers' auxiliary tensors."""
    nbuf = max(2, math.ceil(rotate_bytes / (math.prod(shape) * 4)))
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = [(torch.randn(shape, generator=gen) * 3).to(device) for _ in range(nbuf)]
    b, c = shape[:2]
    regions = None
    if with_regions:
        regions = (torch.arange(shape[-1]) * NUM_REGIONS // shape[-1]).expand(b, *shape[2:]).contiguous().to(device)
    k = c * (NUM_REGIONS if with_regions else 1)
    vox = math.prod(shape[2:])
    aux = {
        "targets": torch.rand(b, k, generator=gen).to(device) * vox / k,
        "weights": torch.ones(b, k, device=device),
        "index": loss_inputs(c, with_regions, device),
        "scale": torch.full((k,), vox / k, device=device),
        "w": torch.randn((b, c, NUM_REGIONS) if with_regions else (b, c), generator=gen).to(device),
    }
    return logits, regions, aux


def time_provider(fn, logits, regions, aux, device, reps):
    """(median, p20, p80, GPU ms or None) ms per mode of one provider, and the peak MiB of
    forward+backward. The first three time whole calls (CUDA events on a GPU); the GPU ms, on a GPU
    only, the device activity of the same calls (gpu_ms)."""
    nbuf = len(logits)
    leaves = [x.clone().requires_grad_() for x in logits]

    def fwd(i):
        with torch.no_grad():
            fn(leaves[i % nbuf], regions, aux)

    def fwd_bwd(i):
        leaves[i % nbuf].grad = None
        fn(leaves[i % nbuf], regions, aux).backward()

    graphs = [fn(x, regions, aux) for x in leaves]

    def bwd(i):
        leaves[i % nbuf].grad = None
        graphs[i % nbuf].backward(retain_graph=True)

    row = {}
    for mode, call in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        t = sorted(timed(call, reps, device))
        q = statistics.quantiles(t, n=5) if len(t) >= 5 else [t[0]] * 4
        row[mode] = (statistics.median(t), q[0], q[3], gpu_ms(call, reps) if device.startswith("cuda") else None)
    graphs.clear()
    return row, peak_memory_mb(lambda: fwd_bwd(0), device)


def run_case(shape, with_regions, device, reps, providers, rotate_bytes=ROTATE_BYTES):
    """Every provider's timings on one case; a provider that raises (e.g. torch.compile without
    its toolchain) is reported and left out, so the others still run."""
    logits, regions, aux = case_inputs(shape, with_regions, device, rotate_bytes)
    logit_bytes = math.prod(shape) * 4
    region_bytes = regions.numel() * 8 if regions is not None else 0
    floor_bytes = {"fwd": logit_bytes + region_bytes, "bwd": 2 * logit_bytes + region_bytes}
    floor_bytes["fwd+bwd"] = floor_bytes["fwd"] + floor_bytes["bwd"]
    results = []
    for provider, fn in providers.items():
        try:
            row, mb = time_provider(fn, logits, regions, aux, device, reps)
        except Exception as exc:  # report and go on with the other providers
            first = (str(exc).splitlines() or [""])[0][:300]
            print(f"ERROR provider {provider} failed: {type(exc).__name__}: {first}", flush=True)
            continue
        results.append((provider, row, mb))
    return results, floor_bytes, logit_bytes


def judged_ms(row: tuple) -> float:
    """The time a target is judged on: GPU ms where measured (the kernels' own cost), else the call's median."""
    return row[3] if row[3] is not None else row[0]


def verdicts(label: str, results, floor_bytes, bw: float) -> list[str]:
    """PASS/FAIL lines of segcft against the targets, one per mode and target (on GPU time where
    measured: the targets are the kernels', and every provider is judged the same way)."""
    by = {p: r for p, r, _ in results}
    if "segcft" not in by or "eager" not in by:
        return [f"FAIL {label}: no segcft or eager timings"]
    lines = []
    for mode in ("fwd", "bwd", "fwd+bwd"):
        ours = judged_ms(by["segcft"][mode])
        label_mode = f"{mode} (GPU time)" if by["segcft"][mode][3] is not None else mode
        eager_x = judged_ms(by["eager"][mode]) / ours
        lines.append(f"{'PASS' if eager_x >= TARGET_EAGER_X else 'FAIL'} {label} {label_mode}: "
                     f"{eager_x:.2f}x eager (target >= {TARGET_EAGER_X:g}x)")
        if "compile" in by:
            compile_x = judged_ms(by["compile"][mode]) / ours
            lines.append(f"{'PASS' if compile_x >= 1.0 else 'FAIL'} {label} {label_mode}: "
                         f"{compile_x:.2f}x torch.compile (target >= 1x)")
        pct = 100 * floor_bytes[mode] / bw / (ours / 1e3)
        lines.append(f"{'PASS' if pct >= TARGET_COPY_PCT else 'FAIL'} {label} {label_mode}: "
                     f"{pct:.0f} % of copy bandwidth (target >= {TARGET_COPY_PCT:g} %)")
    return lines


def open_csv(path: Path):
    """The CSV file to append to, its header written or brought up to date (older files lack the
    op, pct_copy_bw and copy_GBps columns: their rows are the area loss)."""
    if path.exists():
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] != CSV_HEADER:
            old = rows[0]
            fixed = [CSV_HEADER] + [[dict(zip(old, r)).get(k, "area_loss" if k == "op" else "") for k in CSV_HEADER]
                                    for r in rows[1:]]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(fixed)
        f = path.open("a", newline="")
        if not rows:
            csv.writer(f).writerow(CSV_HEADER)
        return f
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("w", newline="")
    csv.writer(f).writerow(CSV_HEADER)
    return f


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per mode (default 30, --quick 7)")
    parser.add_argument("--quick", action="store_true", help="2D cases only, fewer repetitions")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile provider (default inductor; eager for a dry run)")
    parser.add_argument("--cases", nargs="+", default=None,
                        help=f"cases to run: names in {list(CASES) + list(GPU_CASES)} or any 2d-BxCxHxW / "
                        "3d-BxCxDxHxW (default: the first three; --quick: the 2D case)")
    parser.add_argument("--regions", choices=("both", "no", "yes"), default="both",
                        help="run each case without a region map, with one, or both (default)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=["area_loss"],
                        help="ops to time (default: area_loss)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) for every provider (the segcft kernels use as many)")
    parser.add_argument("--copy-mb", type=int, default=None,
                        help="MiB of the bandwidth copy (default 64 on a CPU, 1024 on a GPU: beyond its cache)")
    parser.add_argument("--rotate-mb", type=float, default=ROTATE_BYTES / 2**20,
                        help="MiB of logits buffers cycled per case (default 96; small for a dry run)")
    parser.add_argument("--csv", type=Path, default=Path(__file__).parent / "results.csv")
    args = parser.parse_args(argv)
    for name in args.cases or ():
        try:
            parse_case(name)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--cases: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reps = args.reps or (7 if args.quick else 30)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compile_backend = None if args.no_compile else args.compile_backend
    copy_mb = args.copy_mb or (1024 if device.startswith("cuda") else 64)
    bw = copy_bandwidth(device, max(reps, 10), copy_mb)
    backend = ops.cpu_backend() if device == "cpu" else ops.cuda_backend()
    versions = f"torch {torch.__version__}; segcft backend {backend.name}"
    dev = device_name(device)
    sha = git_sha()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"device: {dev}; {versions}; copy bandwidth {bw / 1e9:.1f} GB/s ({copy_mb} MiB); reps {reps}; git {sha}")
    if backend.module is None:
        print(f"WARNING: no compiled segcft module for {device} ({backend.reason}): segcft runs the reference")
    header = (f"{'case':<28}{'op':<10}{'provider':<9}{'mode':<9}{'median ms':>10}{'p20':>9}{'p80':>9}"
              f"{'floor ms':>10}{'x floor':>8}{'% copy':>7}{'peak MB':>9}{'GPU ms':>9}")
    print(header, flush=True)
    names = args.cases or [k for k in CASES if not args.quick or k.startswith("2d")]
    region_modes = {"both": (False, True), "no": (False,), "yes": (True,)}[args.regions]
    verdict_lines, count = [], 0
    with open_csv(args.csv) as f:
        w = csv.writer(f)
        for name in names:
            for with_regions in region_modes:
                case = name + ("+regions" if with_regions else "")
                for op in args.ops:
                    providers = make_providers(op, compile_backend)
                    results, floor_bytes, _ = run_case(parse_case(name), with_regions, device, reps,
                                                                 providers, int(args.rotate_mb * 2**20))
                    for provider, row, mb in results:
                        for mode, (med, p20, p80, gms) in row.items():
                            floor_ms = floor_bytes[mode] / bw * 1e3
                            mem = f"{mb:9.1f}" if mode == "fwd+bwd" else " " * 9
                            gcol = f"{gms:9.3f}" if gms is not None else ""
                            print(f"{case:<28}{op:<10}{provider:<9}{mode:<9}{med:10.3f}{p20:9.3f}{p80:9.3f}"
                                  f"{floor_ms:10.3f}{med / floor_ms:8.2f}{100 * floor_ms / med:7.0f}{mem}{gcol}")
                            w.writerow([stamp, provider, case, mode, f"{med:.4f}", f"{p20:.4f}", f"{p80:.4f}",
                                        f"{floor_ms:.4f}", f"{mb:.1f}" if mode == "fwd+bwd" else "", dev, versions,
                                        sha, op, f"{100 * floor_ms / med:.1f}", f"{bw / 1e9:.1f}",
                                        f"{gms:.4f}" if gms is not None else "",
                                        f"{100 * floor_ms / gms:.1f}" if gms is not None else ""])
                            count += 1
                    f.flush()
                    lines = verdicts(f"{case} {op}", results, floor_bytes, bw)
                    print("\n".join(lines), flush=True)
                    verdict_lines += lines
    fails = sum(line.startswith("FAIL") for line in verdict_lines)
    print(f"targets: {len(verdict_lines) - fails} PASS, {fails} FAIL; appended {count} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
