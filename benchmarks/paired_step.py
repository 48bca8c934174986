"""One generator training step of this checkout's HVAE against an earlier revision's, paired in
one process: the speed-up of a change that keeps the maths.

    OMP_NUM_THREADS=1 python benchmarks/paired_step.py --against GIT_REV [--shape 64|3d]
        [--reps 30] [--warmup 3]

The earlier revision's ``segcft/models/hvae.py`` and ``hvae_blocks.py`` are taken from git (``git
archive``) and loaded as separate modules; their forward methods (``HVAE._decode`` and
``_likelihood``, every method of ``DecoderBlock`` and ``Block``) are bound to a deep copy of this checkout's
model, and its 3x3 (3x3x3) convolutions run as ``nn.Conv2d`` (``nn.Conv3d``) when the revision
predates ``segcft.ops.Conv3x3`` (``Conv3x3x3``). Both models then hold the same weights, see the
same batch and the same noise (the seed is reset before each step), and train with their own
FlatAdamW. Steps alternate (A B, B A, ...), so load on a shared machine hits both alike; the figure
is the median CPU time of the thread over ``--reps`` steps each. ``--against HEAD`` is the A/A
control: its ratio shows the noise floor. The losses of the last step are printed too: a change
that keeps the maths agrees to float rounding. Only methods of those classes are swapped, so a
revision that changed their signatures or other modules cannot be paired this way.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import ref_step  # noqa: E402  (the same model, batch and optimiser as the reference benchmark)

FILES = ("segcft/models/hvae_blocks.py", "segcft/models/hvae.py")


def _load_revision(rev: str, into: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(hvae_blocks, hvae) of git revision ``rev``, loaded under private module names."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, *FILES], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    modules = []
    for name, rel in zip(("_paired_hvae_blocks", "_paired_hvae"), FILES):
        spec = importlib.util.spec_from_file_location(name, into / rel)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def _bind(model: torch.nn.Module, blocks: types.ModuleType, hvae: types.ModuleType) -> None:
    """Give ``model`` the earlier revision's forward methods."""
    for name in ("_decode", "_likelihood"):
        setattr(model, name, types.MethodType(getattr(hvae.HVAE, name), model))
    from segcft.ops import Conv3x3, Conv3x3x3

    def methods(cls_name: str) -> list[str]:
        """Every method the revision defines on its Block / DecoderBlock (helpers included)."""
        if cls_name not in ("Block", "DecoderBlock"):
            return []
        return [k for k, f in vars(getattr(blocks, cls_name)).items() if callable(f) and not k.startswith("__")]

    for module in model.modules():
        for cls, base in ((Conv3x3, torch.nn.Conv2d), (Conv3x3x3, torch.nn.Conv3d)):
            if isinstance(module, cls) and not hasattr(blocks, cls.__name__):  # built as the base then
                module.forward = types.MethodType(base.forward, module)
        for name in methods(type(module).__name__):
            setattr(module, name, types.MethodType(getattr(getattr(blocks, type(module).__name__), name), module))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="the git revision to compare with (HEAD: A/A control)")
    p.add_argument("--shape", choices=("64", "3d"), default="64")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from segcft.train.context import keep_freed_memory

    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            modules = _load_revision(args.against, Path(tmp))
        except subprocess.CalledProcessError as err:
            p.error(f"--against: git cannot read {', '.join(FILES)} at {args.against!r}: {err.stderr.decode().strip()}")
    batch = ref_step.BATCH[args.shape]
    new = ref_step.segcft_variant(args.shape, batch)
    old_model = copy.deepcopy(new.model)
    _bind(old_model, *modules)
    _, x, pa = ref_step._data(args.shape, batch)
    if args.shape == "64":
        x = x.contiguous(memory_format=torch.channels_last)
    from segcft.optim import build_optimizer

    models = {"now": new.model, args.against: old_model}
    opts = {
        k: build_optimizer(m.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.9))[0] for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, float] = {}
    names = list(models)
    for i in range(args.warmup + args.reps):
        for name in names if i % 2 == 0 else names[::-1]:
            torch.manual_seed(i)
            start = time.thread_time()
            loss = models[name].elbo(x, pa)["loss"]
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            elapsed = time.thread_time() - start
            if i >= args.warmup:
                times[name].append(elapsed * 1e3)
                losses[name] = float(loss.detach())
    old, now = statistics.median(times[args.against]), statistics.median(times["now"])
    print(f"{args.shape}: {args.against} {old:.1f} ms, now {now:.1f} ms (median CPU ms of {args.reps} steps)")
    print(f"last losses: {args.against} {losses[args.against]:.6f}, now {losses['now']:.6f}")
    print(f"paired step speed-up vs {args.against}: {old / now:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
