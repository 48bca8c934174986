"""The likelihood head's weight gradient: the convolution's own backward against a product and a sum.

    python benchmarks/head_grad.py [--device cuda] [--volume 128x64x64] [--batch 8] [--reps 5] [--rounds 2]

On an H200 the profile of the 3D reg:bf16 step (RESULTS.md, session 16) put a float32 (TF32)
convolution weight-gradient kernel at 46.5 ms of a 190 ms step. The HVAE's likelihood head (a
1x1x1 convolution, 8 -> 2 channels at full resolution, run in float32 outside autocast) is the
step's only float32 convolution: its weight gradient reduces 8 x 128 x 64 x 64 positions into 16
numbers, which cuDNN's implicit-GEMM kernels parallelise poorly. The candidate route computes
that gradient per output channel as (x * g[:, o]).sum over batch and space, a pass at memory speed.

Side by side in one process: the head alone (forward + backward, each route's relative error
against float64), then the 3D step (reg:bf16 and pos-seg, ``step.bench_3d``) with the head on each
route, the routes alternating round by round. Rows go to --out (CSV); the last line is
``head route step speed-up (reg:bf16): N.NNx`` (conv step time over product-sum step time). The
product's head stays the convolution until this shows a gain on a GPU. On the CPU the head runs
``segcft.ops.gelu_pointwise`` (the route swapped here is the one it falls back to elsewhere), so
there both routes time the same step.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import step  # noqa: E402  (benchmarks/step.py: the 3D step and its volume parser)

from segcft.models.hvae_blocks import pointwise_conv  # noqa: E402

ROUTES = ("conv", "product-sum")


class ProductSumConv(torch.autograd.Function):
    """A 1x1 (1x1x1) convolution whose weight gradient is, per output channel, a product and a
    sum over batch and space; the input gradient is the transposed 1x1 convolution."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return pointwise_conv(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dims = (0, *range(2, x.dim()))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (F.conv2d if x.dim() == 4 else F.conv3d)(g, weight.transpose(0, 1))
        if ctx.needs_input_grad[1]:
            gw = torch.stack([(x * g[:, o : o + 1]).sum(dims) for o in range(weight.shape[0])]).view_as(weight)
        if ctx.needs_input_grad[2]:
            gb = g.sum(dims)
        return gx, gw, gb


def product_sum_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The candidate route, with ``segcft.models.hvae_blocks.pointwise_conv``'s signature."""
    return ProductSumConv.apply(x, weight, bias)


def _route(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return pointwise_conv if name == "conv" else product_sum_conv


def _time_ms(fn: Callable[[], None], device: str, n: int) -> list[float]:
    """n timed calls after 3 warm-ups: CUDA events on a GPU, CPU seconds of this process on a CPU."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.process_time()
            fn()
            out.append(1e3 * (time.process_time() - t0))
    return sorted(out)


def head_rows(channels: int, volume: str, batch: int, device: str, n: int) -> list[dict[str, object]]:
    """The head alone, fwd+bwd in float32 on each route, with its errors against float64."""
    depth, side = step._volume(volume)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, channels, depth, side, side, generator=gen).to(device).requires_grad_()
    w = torch.randn(2, channels, 1, 1, 1, generator=gen).to(device).requires_grad_()
    b = torch.randn(2, generator=gen).to(device).requires_grad_()
    g = torch.randn(batch, 2, depth, side, side, generator=gen).to(device)
    ref = torch.autograd.grad(F.conv3d(x.double(), w.double(), b.double()), (x, w, b), g.double())
    rows: list[dict[str, object]] = []
    for name in ROUTES:
        route = _route(name)

        def fn(route: Callable[..., torch.Tensor] = route) -> None:
            route(x, w, b).backward(g)

        x.grad = w.grad = b.grad = None
        fn()
        errs = [float((t.grad.double() - r).norm() / r.norm()) for t, r in zip((x, w, b), ref)]  # type: ignore[union-attr]
        ts = _time_ms(fn, device, n)
        rows.append(
            {
                "case": f"head {batch}x{channels}x{depth}x{side}x{side}",
                "route": name,
                "ms": round(statistics.median(ts), 4),
                "min_ms": round(ts[0], 4),
                "max_ms": round(ts[-1], 4),
                "rel_err_x": f"{errs[0]:.1e}",
                "rel_err_w": f"{errs[1]:.1e}",
                "rel_err_b": f"{errs[2]:.1e}",
            }
        )
    return rows


def step_rows(volume: str, batch: int, reps: int, rounds: int, device: str) -> list[dict[str, object]]:
    """The 3D step with the head on each route: ``rounds`` rounds, the routes alternating, each
    a ``step.bench_3d`` of reg:bf16 and pos-seg; the median over rounds of each round's median."""
    from segcft.models import hvae

    specs = ["reg:bf16", "pos-seg"]
    times: dict[tuple[str, str], list[float]] = {(r, s): [] for r in ROUTES for s in specs}
    loss: dict[tuple[str, str], object] = {}
    try:
        for rnd in range(rounds):
            for name in ROUTES if rnd % 2 == 0 else ROUTES[::-1]:
                hvae.pointwise_conv = _route(name)  # type: ignore[assignment]
                for r in step.bench_3d(volume, specs, batch, reps, False, device):
                    key = (name, str(r["spec"]))
                    times[key].append(float(r.get("step_s", r.get("step_cpu_s"))))  # type: ignore[arg-type]
                    loss[key] = r["first_loss"]
    finally:
        hvae.pointwise_conv = _route("conv")  # type: ignore[assignment]
    return [
        {
            "case": f"step {volume} {spec} batch {batch}",
            "route": name,
            "ms": round(1e3 * statistics.median(times[(name, spec)]), 2),
            "min_ms": round(1e3 * min(times[(name, spec)]), 2),
            "max_ms": round(1e3 * max(times[(name, spec)]), 2),
            "first_loss": loss[(name, spec)],
        }
        for spec in specs
        for name in ROUTES
    ]


def _volume_arg(spec: str) -> str:
    """--volume as given, once ``step._volume`` has read it (a bad one is a usage error, exit 2)."""
    step._volume(spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--volume", default="128x64x64", type=_volume_arg, help="DxSxS of the 3D step (ccta-phantom)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed steps per route and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the step, the routes alternating")
    p.add_argument("--channels", type=int, default=8, help="the head's input channels (the 3d preset's 8)")
    p.add_argument("--out", type=Path, default=Path("head_grad.csv"))
    args = p.parse_args(argv)
    rows = head_rows(args.channels, args.volume, args.batch, args.device, 20)
    for r in rows:
        print(r, flush=True)
    srows = step_rows(args.volume, args.batch, args.reps, args.rounds, args.device)
    for r in srows:
        print(r, flush=True)
    rows += srows
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    ms = {(r["case"], r["route"]): float(r["ms"]) for r in rows}  # type: ignore[arg-type]
    head = rows[0]["case"]
    print(f"head alone, fwd+bwd: conv {ms[(head, 'conv')]} ms, product-sum {ms[(head, 'product-sum')]} ms")
    step_case = f"step {args.volume} reg:bf16 batch {args.batch}"
    print(f"head route step speed-up (reg:bf16): {ms[(step_case, 'conv')] / ms[(step_case, 'product-sum')]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
