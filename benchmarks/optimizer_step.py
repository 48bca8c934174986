"""The generator training step with torch's AdamW (``foreach``, one tensor at a time on a CPU)
and with segcft's FlatAdamW (one flat buffer), side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_step.py [--reps 25] [--shape 64|3d] [--guarded]

Both models start from the same weights and see the same batch and noise (the quick preset's generator
batch of the phantom); their steps are interleaved, and the median CPU time of the thread per
step is compared. ``--guarded`` steps through GuardedStepper with clipping and an EMA, as the
fine-tuning stages do; without it a step is forward, backward, ``opt.step()`` and
``zero_grad``, as in benchmarks/ref_step.py. The run checks that both end with the same
weights and prints the speed-up as its last line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ref_step import BATCH, _data  # the phantom batch ref_step.py times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="64", choices=["64", "3d"])
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--guarded", action="store_true", help="clip at 50 and keep an EMA (GuardedStepper)")
    args = p.parse_args(argv)

    from segcft.models.hvae import HVAE, HVAEConfig
    from segcft.optim import EMA, GuardedStepper, build_optimizer

    info, x, pa = _data(args.shape, BATCH[args.shape])
    layout = torch.channels_last if info.spatial_dims == 2 else torch.contiguous_format
    x = x.contiguous(memory_format=layout)

    def build(flat: bool) -> tuple[torch.nn.Module, GuardedStepper]:
        torch.manual_seed(0)
        model = HVAE(HVAEConfig(preset="64" if args.shape == "64" else "3d"), tuple(info.shape), len(info.variables))
        model = model.to(memory_format=layout)  # type: ignore[call-overload]  # as the generator stage trains it
        if flat:
            opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)[0]
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.9), foreach=True)
        ema = EMA(model, 0.999) if args.guarded else None
        return model, GuardedStepper(model.parameters(), opt, None, 50.0 if args.guarded else 0.0, 0.0, ema, model)

    variants = {"torch AdamW": build(False), "FlatAdamW": build(True)}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.warmup + args.reps):
        for name, (model, stepper) in variants.items():
            torch.manual_seed(rep)  # the same posterior samples for both
            c0 = time.thread_time()
            loss = model.elbo(x, pa)["loss"]
            loss.backward()
            if args.guarded:
                stepper.step(loss)
            else:
                stepper.optimizer.step()
                stepper.optimizer.zero_grad(set_to_none=True)
            if rep >= args.warmup:
                cpu[name].append(time.thread_time() - c0)
    (a, _), (b, _) = variants.values()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    mode = "guarded (clip + EMA)" if args.guarded else "plain"
    threads = torch.get_num_threads()
    print(f"shape {args.shape}, {mode}, {threads} thread(s), {args.reps} reps; max weight difference {diff:.3g}")
    for k, v in ms.items():
        print(f"{k}: {v:.1f} CPU ms / step")
    print(f"optimizer step speed-up (FlatAdamW vs torch AdamW): {ms['torch AdamW'] / ms['FlatAdamW']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
