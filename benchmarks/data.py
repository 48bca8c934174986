"""Phantom generation throughput on one CPU core (samples/s), batched as a DataLoader does.

Run: python benchmarks/data.py [--batches N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import time

import torch

from segcft.data import ccta_phantom, cxr_phantom


def throughput(ds, batch_size: int, batches: int) -> tuple[float, float]:
    """Samples per wall second and per CPU second (what one dedicated core reaches on a shared
    machine) of shuffled batches fetched and collated by a single-process DataLoader."""
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    it = iter(loader)
    next(it)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, ds in (
        ("cxr-phantom 64x64", cxr_phantom.build(None, "train")),
        ("cxr-phantom 192x192", cxr_phantom.build(cxr_phantom.CXRPhantomConfig(size=192), "train")),
        ("ccta-phantom 64x32x32", ccta_phantom.build(None, "train")),
    ):
        wall, cpu = throughput(ds, args.batch_size, args.batches)
        print(f"{name:<24} {cpu:8.1f} samples/CPU-s {wall:8.1f} samples/wall-s (1 thread, batch {args.batch_size})")


if __name__ == "__main__":
    main()
