"""Page faults of a CPU generator step under glibc's default malloc, glibc settings that keep freed
memory (among them segcft's), and torch's huge-page allocation; and whether each lets the heap grow
in a plain allocate-free loop.

Each variant runs in a fresh interpreter (allocation settings are per process), with its
environment variables set as a user would set them:

    python benchmarks/page_faults.py [--shapes 64 3d] [--steps 12] [--threads 1]

Prints, per shape and variant: the median CPU ms of a generator step (segcft's HVAE at the quick
preset's batch; the calling thread's CPU time, so with --threads above 1 the main thread's share
only), minor page faults and kernel ms per step, and resident MiB. Then the growth probe:
resident MiB after 10 and 40 iterations of "allocate 8 x 8 MiB, keep 50 small tensors, free".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "keep freed memory": {
        "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
        ":glibc.malloc.top_pad=67108864"
    },
    "mmap threshold 32 MiB only": {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432"},
    # torch's own switch: page-aligned blocks of 2 MiB and more, advised as transparent huge pages
    "torch THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    # what segcft.train.context.keep_freed_memory sets through mallopt: no mapped blocks, no trimming
    "segcft: heap only, no trim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"},
    "heap only, no trim + THP": {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": "2147483647",
        "THP_MEM_ALLOC_ENABLE": "1",
    },
}
"""Each variant's environment, on top of the caller's with every allocation setting removed."""

ALLOCATION_VARIABLES = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


STEP = """
import json, os, resource, statistics, sys, time, torch
sys.path.insert(0, {bench!r})
import ref_step
torch.set_num_threads({threads})
shape = {shape!r}
v = ref_step.segcft_variant(shape, ref_step.BATCH[shape])
for _ in range(3):
    v.step()
r0 = resource.getrusage(resource.RUSAGE_SELF)
ts = []
for _ in range({steps}):
    t0 = time.thread_time(); v.step(); ts.append(time.thread_time() - t0)
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = len(ts)
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(json.dumps({{"ms": statistics.median(ts) * 1e3, "faults": (r1.ru_minflt - r0.ru_minflt) / n,
                  "sys_ms": (r1.ru_stime - r0.ru_stime) / n * 1e3, "rss": rss}}))
"""

GROWTH = """
import json, torch
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def step():
    acts = [torch.empty(2 << 20).fill_(1.0) for _ in range(8)]
    kept = [torch.empty(100) for _ in range(50)]
    del acts
    return kept
keep, seen = [], []
for i in range(40):
    keep.append(step())
    seen.append(rss())
print(json.dumps({"rss_10": seen[9], "rss_40": seen[-1]}))
"""


def _run(code: str, variant: dict[str, str], threads: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATION_VARIABLES and not k.startswith("MALLOC_")}
    env.update(variant, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["64", "3d"], choices=["64", "3d"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        p.error(f"--steps and --threads must be >= 1, got {args.steps} and {args.threads}")
    bench = str(ROOT / "benchmarks")
    print("shape | variant | step ms | minor faults / step | kernel ms / step | resident MiB")
    for shape in args.shapes:
        for name, variant in VARIANTS.items():
            code = STEP.format(bench=bench, threads=args.threads, shape=shape, steps=args.steps)
            r = _run(code, variant, args.threads)
            print(f"{shape} | {name} | {r['ms']:.1f} | {r['faults']:.0f} | {r['sys_ms']:.1f} | {r['rss']:.0f}")
    print("growth probe | variant | resident MiB after 10 / 40 iterations")
    for name, variant in VARIANTS.items():
        r = _run(GROWTH, variant, args.threads)
        print(f"growth | {name} | {r['rss_10']:.0f} / {r['rss_40']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
