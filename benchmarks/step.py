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

    python benchmarks/step.py --volumes 64x32x32 128x64x64 [--modes none reg seg pos-seg] [--profile] [--peak]

Either form takes --cudnn-benchmark (on a GPU, cuDNN picks each convolution's algorithm by timing
it on the first step; off by default, as in training, where it would let the same seed pick
other algorithms from run to run).

The 3D fine-tuning step (ccta-phantom at each DxHxW size, same anatomy and field of view, the
voxel spacing scaled; generator preset "3d"): every mode is built once in one process, from the
same weights, and the modes' steps are interleaved rep by rep (CPU seconds, median; min and max
as the noise). Mode none is the generator's own training step (nelbo of the real batch, no
counterfactual, no guide); reg, seg and pos-seg are the objectives' steps with both frozen guides
(seg and pos-seg use the regressor for the subject-level variables). A mode may carry options,
``pos-seg:cl:bf16``: cl runs the segmentor on channels_last_3d, bf16 the step's forward under
autocast (CPU or CUDA), compile the segmentor under torch.compile (the first step's wall time is
printed). With --device cuda the steps are timed in wall seconds after a synchronize (volumes/s).
--profile adds one torch.profiler step per mode: on a CPU grouped into generator, segmentor and regressor
forward and backward (a backward node goes to the label its forward op ran under), the fused area
loss, the optimiser and the rest; on a GPU the step's wall time, the time the GPU was busy and the
costliest kernels. --peak (CPU only) measures each mode's peak memory in a fresh process.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
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


def _cft_config() -> Any:
    """The fine-tuning section at its defaults (the Lagrangian and guide weights a run starts from)."""
    from segcft.config.schema import CFTConfig

    return CFTConfig()


def bench(shape: str, variant: str, batch: int, reps: int, device: torch.device) -> dict[str, object]:
    """Time ``reps`` fine-tuning steps after one warm-up step, in this process."""
    from segcft.dscm import permutation_intervention
    from segcft.objectives.base import build_objective

    if variant == "seg-reference":
        import segcft.ops as ops
        from segcft.ops import reference

        ops.area_loss = reference.area_loss  # this process only runs this variant
    ds, info, dscm, seg, regressor = _setup(shape, device)
    mode = "reg" if variant == "reg" else ("pos-seg" if shape == "3d" else "seg")
    obj = build_objective(mode, info, _cft_config(), eps=1.0, segmentor=seg, regressor=regressor).to(device)
    items = ds.__getitems__(list(range(batch)))
    b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    opt = torch.optim.AdamW(dscm.generator.parameters(), lr=1e-4)
    do = permutation_intervention(
        info, b["parents"], torch.Generator().manual_seed(0), [v.name for v in info.structure_variables]
    )

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
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
    )
    return {
        "shape": shape,
        "variant": variant,
        "mode": mode,
        "batch": batch,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "step_s": round(wall, 4),
        "samples_per_s": round(batch / wall, 2),
        "samples_per_cpu_s": round(batch / cpu, 2) if device.type == "cpu" else "",
        "peak_mb": round(peak, 1),
    }


# -- 3D fine-tuning step: modes side by side, with a profile ---------------------------------

MODES_3D = ("none", "reg", "seg", "pos-seg")
OPTIONS_3D = ("cl", "bf16", "compile")
GROUPS = (
    "generator fwd",
    "generator bwd",
    "segmentor fwd",
    "segmentor bwd",
    "regressor fwd",
    "regressor bwd",
    "area loss fwd+bwd",
    "optimizer",
    "other",
)
_LABELS = {"generator": "generator", "segmentor": "segmentor", "regressor": "regressor", "area loss": "area loss"}


def _volume(spec: str) -> tuple[int, int]:
    d, h, w = (int(s) for s in spec.lower().split("x"))
    if h != w:
        raise argparse.ArgumentTypeError(f"volume {spec!r}: ccta-phantom volumes are DxSxS (H == W)")
    return d, h


class _Labelled(torch.nn.Module):
    """A guide whose forward (the segmentor's logits, the regressor's prediction given parents) runs
    under a profiler label (and, with ``cl``, on channels_last_3d)."""

    def __init__(self, inner: torch.nn.Module, label: str, channels_last: bool = False) -> None:
        super().__init__()
        self.inner, self.label, self.cl = inner, label, channels_last
        self.classes = getattr(inner, "classes", ())

    def forward(self, x: torch.Tensor, *args: Any) -> Any:
        with torch.profiler.record_function(self.label):
            if self.cl:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            return self.inner(x, *args)


class _Case:
    """One mode spec (``mode[:option...]``) of the 3D step: its own generator copy, optimiser,
    objective and guides, all starting from the same weights."""

    def __init__(self, spec: str, parts: dict[str, Any], cft: Any, device: str = "cpu") -> None:
        import copy

        from segcft.objectives.base import build_objective

        self.spec = spec
        self.mode, *opts = spec.split(":")
        if self.mode not in MODES_3D or any(o not in OPTIONS_3D for o in opts):
            raise SystemExit(
                f"--modes: {spec!r} is not MODE[:OPTION...] with MODE in {MODES_3D}, OPTION in {OPTIONS_3D}"
            )
        self.bf16 = "bf16" in opts
        self.device = torch.device(device)
        self.dscm = copy.deepcopy(parts["dscm"])
        self.opt = torch.optim.AdamW(self.dscm.generator.parameters(), lr=1e-4)
        self.obj = None
        self.compile_s = 0.0
        if self.mode != "none":
            seg = copy.deepcopy(parts["seg"])
            if "cl" in opts:
                seg = seg.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
            if "compile" in opts:
                seg = torch.compile(seg)
            regressor = _Labelled(copy.deepcopy(parts["regressor"]), "regressor")
            self.obj = build_objective(
                self.mode,
                parts["info"],
                cft,
                eps=1.0,
                segmentor=_Labelled(seg, "segmentor", "cl" in opts),
                regressor=regressor,
            )
        cf = self.dscm.counterfactual_with_elbo

        def labelled_cf(*a: Any) -> Any:
            with torch.profiler.record_function("generator"):
                return cf(*a)

        self.dscm.counterfactual_with_elbo = labelled_cf

    def step(self, b: dict[str, torch.Tensor], do: Any) -> float:
        """One step (seeded, so every case draws the same z); returns the loss."""
        torch.manual_seed(1)
        with torch.profiler.record_function("step"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                if self.obj is None:
                    with torch.profiler.record_function("generator"):
                        loss = self.dscm.generator.elbo(b["image"], b["parents"])["loss"]
                else:
                    loss = self.obj(self.dscm, b, intervention=do)["loss"]
            with torch.profiler.record_function("backward"):
                loss.backward()
            with torch.profiler.record_function("optimizer"):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def _parts_3d(
    depth: int, side: int, batch: int, device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    import segcft.ops as ops
    from segcft.dscm import DSCM, permutation_intervention
    from segcft.models.mechanisms import ParentSCM
    from segcft.plugins import get_registry

    entry = get_registry().get("dataset", "ccta-phantom")
    ds = entry.load()(entry.config(depth=depth, side=side), "train")
    info = ds.info
    torch.manual_seed(0)
    gen = _build("generator", "hvae", info, preset="3d")
    parts = {
        "info": info,
        "seg": _build("segmentor", "unet", info).to(device),
        "regressor": _build("regressor", "cnn", info).to(device),
        "dscm": DSCM(info, ParentSCM(info).eval().requires_grad_(False), gen).to(device),
    }
    area_loss = ops.area_loss

    def labelled_area_loss(*a: Any, **k: Any) -> torch.Tensor:
        with torch.profiler.record_function("area loss"):
            return area_loss(*a, **k)

    ops.area_loss = labelled_area_loss  # type: ignore[assignment]  # this process only
    items = ds.__getitems__(list(range(batch)))
    b = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
    structures = [v.name for v in info.structure_variables]
    do = permutation_intervention(info, b["parents"], torch.Generator().manual_seed(0), structures)
    return parts, b, do


def _profile_groups(prof: Any) -> dict[str, float]:
    """ms per group of one profiled step: forwards by their labels, backward nodes by the label
    their forward op ran under (autograd sequence numbers), the rest of the step as other."""
    events = list(prof.events())
    ranges = {
        lab: [(e.time_range.start, e.time_range.end) for e in events if e.name == lab]
        for lab in (*_LABELS, "step", "optimizer")
    }
    owner: dict[int, str] = {}
    for e in events:
        if e.sequence_nr < 0 or e.name.startswith("autograd::"):
            continue
        for lab in ("area loss", "segmentor", "regressor", "generator"):
            if any(s <= e.time_range.start < t for s, t in ranges[lab]):
                owner.setdefault(e.sequence_nr, lab)
                break
    ms = {g: 0.0 for g in GROUPS}
    for lab in _LABELS:
        fwd = sum(t - s for s, t in ranges[lab]) / 1e3
        ms["area loss fwd+bwd" if lab == "area loss" else f"{lab} fwd"] += fwd
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            lab = owner.get(e.sequence_nr, "generator" if "AccumulateGrad" in e.name else "")
            if lab:
                ms["area loss fwd+bwd" if lab == "area loss" else f"{lab} bwd"] += e.cpu_time_total / 1e3
    ms["optimizer"] = sum(t - s for s, t in ranges["optimizer"]) / 1e3
    total = sum(t - s for s, t in ranges["step"]) / 1e3
    ms["other"] = total - sum(v for g, v in ms.items() if g != "other")
    ms["total"] = total
    return ms


def _device_ms(events: Any) -> dict[str, float]:
    """Milliseconds of GPU activity per kernel (or copy / memset) name among profiler events,
    costliest first. The step's ``record_function`` labels also appear on the GPU timeline (as
    user annotations spanning their kernels): they are left out, or the kernels would count twice."""
    from torch.autograd import DeviceType

    per_name: dict[str, float] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    return dict(sorted(per_name.items(), key=lambda kv: -kv[1]))


def _gpu_profile(case: Any, b: Any, do: Any) -> dict[str, object]:
    """One profiled step on a GPU: its wall ms, the ms the GPU was busy (device events summed; far
    below the wall time means the step waits on the host) and the five costliest kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        case.step(b, do)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    per_kernel = _device_ms(prof.events())
    top = list(per_kernel.items())[:5]
    return {
        "ms wall profiled": round(wall, 1),
        "ms gpu busy": round(sum(per_kernel.values()), 1),
        "top kernels": "; ".join(f"{name[:80]} {ms:.1f} ms" for name, ms in top),
    }


def _clock(device: str) -> float:
    """CPU seconds of this process on a CPU; wall seconds after the queued GPU work on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def bench_3d(
    volume: str, specs: list[str], batch: int, reps: int, profile: bool, device: str = "cpu"
) -> list[dict[str, object]]:
    """Build every case of ``specs`` once, time ``reps`` rounds of one step per case (interleaved;
    CPU seconds of this process on a CPU, wall seconds on a GPU), then profile one step per case
    (on a CPU the groups' CPU time; on a GPU the step's wall and GPU-busy time and its costliest
    kernels)."""
    depth, side = _volume(volume)
    parts, b, do = _parts_3d(depth, side, batch, device)
    cases = [_Case(s, parts, _cft_config(), device) for s in specs]
    first = {}
    for c in cases:  # warm-up (and compilation)
        t0 = time.perf_counter()
        first[c.spec] = c.step(b, do)
        c.compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {c.spec: [] for c in cases}
    for r in range(reps):
        for c in cases if r % 2 == 0 else cases[::-1]:
            c0 = _clock(device)
            c.step(b, do)
            times[c.spec].append(_clock(device) - c0)
    cpu = not device.startswith("cuda")
    rows = []
    for c in cases:
        ts = sorted(times[c.spec])
        med = statistics.median(ts)
        row: dict[str, object] = {
            "volume": volume,
            "spec": c.spec,
            "batch": batch,
            "device": device,
            "threads": torch.get_num_threads(),
            "step_cpu_s" if cpu else "step_s": round(med, 4),
            "min_s": round(ts[0], 4),
            "max_s": round(ts[-1], 4),
            "volumes_per_cpu_s" if cpu else "volumes_per_s": round(batch / med, 3),
            "first_step_wall_s": round(c.compile_s, 2),
            "first_loss": first[c.spec],
        }
        if profile and cpu:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                c.step(b, do)
            row.update({f"ms {g}": round(v, 1) for g, v in _profile_groups(prof).items()})
        elif profile:
            try:  # the timings above stand without it
                row.update(_gpu_profile(c, b, do))
            except Exception as exc:
                print(f"WARNING: GPU profile of {c.spec} failed: {type(exc).__name__}: {exc}", flush=True)
        rows.append(row)
    return rows


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_3d(volume: str, spec: str, batch: int) -> float:
    """Peak resident memory (MiB) of a warm-up step and one step of a single case above the
    resident set before them, in this process (Linux: the high-water mark is reset first, so
    the set-up's own peak, e.g. the phantom's rendering, does not hide the step's)."""
    depth, side = _volume(volume)
    parts, b, do = _parts_3d(depth, side, batch)
    case = _Case(spec, parts, _cft_config())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kb("VmRSS")
    case.step(b, do)
    case.step(b, do)
    return (_status_kb("VmHWM") - start) / 1024


def _report_3d(rows: list[dict[str, object]]) -> None:
    """Print the table, the profile shares and the ratios against reg."""
    by = {(r["volume"], r["spec"]): r for r in rows}
    step_key = "step_cpu_s" if "step_cpu_s" in rows[0] else "step_s"
    for r in rows:
        cpu = step_key == "step_cpu_s"
        rate = f"{r['volumes_per_cpu_s']} volumes/CPU-s" if cpu else f"{r['volumes_per_s']} volumes/s"
        print(
            f"{r['volume']} {r['spec']:>18}: {rate}, step {r[step_key]} s "
            f"(min {r['min_s']}, max {r['max_s']}), peak {r.get('peak_mb', '-')} MiB"
        )
        if "ms gpu busy" in r:
            busy, wall = float(r["ms gpu busy"]), float(r["ms wall profiled"])  # type: ignore[arg-type]
            print(f"    GPU busy {busy} of {wall} ms ({100 * busy / wall:.0f} %); top kernels: {r['top kernels']}")
        if "ms total" in r:
            tot = float(r["ms total"])  # type: ignore[arg-type]
            print(
                "    profile: "
                + ", ".join(
                    f"{g} {100 * float(r['ms ' + g]) / tot:.1f} %"
                    for g in GROUPS  # type: ignore[arg-type]
                    if float(r["ms " + g]) > 0 or g == "other"
                )
            )  # type: ignore[arg-type]
    for vol in dict.fromkeys(r["volume"] for r in rows):
        reg = by.get((vol, "reg"))
        for spec in [s for (v, s) in by if v == vol and s != "reg"]:
            if reg is not None:
                ratio = float(by[(vol, spec)][step_key]) / float(reg[step_key])  # type: ignore[arg-type]
                print(f"{vol} {spec} step / reg step: {ratio:.2f}x")
        for spec in ("seg", "pos-seg"):
            r = by.get((vol, spec))
            if r is not None and "ms total" in r:
                share = 100 * float(r["ms area loss fwd+bwd"]) / float(r["ms total"])  # type: ignore[arg-type]
                ms = f"{r['ms area loss fwd+bwd']} of {r['ms total']} ms profiled"
                print(f"{vol} area loss share of a {spec} step: {share:.1f} % ({ms})")


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
    p.add_argument(
        "--volumes",
        nargs="+",
        type=str,
        help="3D fine-tuning step at these DxHxW ccta-phantom sizes (e.g. 64x32x32 128x64x64) instead of --shapes",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES_3D),
        help="3D cases MODE[:OPTION...], MODE in none/reg/seg/pos-seg, OPTION cl (guide on "
        "channels_last_3d), bf16 (CPU autocast), compile (torch.compile of the guide)",
    )
    p.add_argument("--profile", action="store_true", help="3D: profile one more step per case (CPU or GPU)")
    p.add_argument("--peak", action="store_true", help="3D: peak memory of each case in its own process")
    p.add_argument("--one-peak", nargs=2, metavar=("VOLUME", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="on a GPU: let cuDNN time its convolution algorithms on the first step and keep the fastest",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from segcft.train.context import keep_freed_memory

    keep_freed_memory()  # as a segcft run sets malloc (MALLOC_MMAP_MAX_=65536 keeps glibc's default)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.one_peak:
        print(json.dumps({"peak_mb": round(peak_3d(args.one_peak[0], args.one_peak[1], args.batch), 1)}))
        return 0
    if args.volumes:
        return _main_3d(args)
    if args.one:
        print(json.dumps(bench(args.one[0], args.one[1], args.batch, args.reps, torch.device(args.device))))
        return 0
    rows = []
    for shape in args.shapes:
        for variant in args.variants:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                shape,
                variant,
                "--batch",
                str(args.batch),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                *(["--cudnn-benchmark"] if args.cudnn_benchmark else []),
            ]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            rows.append(row)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


def _main_3d(args: argparse.Namespace) -> int:
    rows = []
    for volume in args.volumes:
        vol_rows = bench_3d(volume, args.modes, args.batch, args.reps, args.profile, args.device)
        for row in vol_rows:
            if args.peak and args.device == "cpu":
                cmd = [
                    sys.executable,
                    __file__,
                    "--one-peak",
                    volume,
                    str(row["spec"]),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            print(row, flush=True)
        rows += vol_rows
    _report_3d(rows)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
