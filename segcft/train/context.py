"""What every stage of a run shares: config, run folder, ranks, device, training split and
metrics log, and the rank-aware writes of stage results."""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component, build_dataset
from segcft.config import component_section
from segcft.data.variables import DatasetInfo
from segcft.distributed import Dist
from segcft.run import RunDir
from segcft.train.metrics_log import MetricsLog
from segcft.train.progress import RunClock
from segcft.train.resume import TrainState, capture_state

__all__ = [
    "CachedSamples",
    "StageContext",
    "available_cpus",
    "cacheable",
    "keep_freed_memory",
    "malloc_choice",
    "release_freed_memory",
    "set_cpu_threads",
]

CACHE_BYTES = 1 << 30
"""Most bytes of training samples kept in memory (further samples are read each time)."""

CGROUP_QUOTAS = (
    (Path("/sys/fs/cgroup/cpu.max"), None),  # cgroup v2: "<quota> <period>" or "max <period>"
    (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),  # v1
)


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host reports 64 cores to torch)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota_file, period_file in CGROUP_QUOTAS:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                n = min(n, max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            continue
    return max(n, 1)


def set_cpu_threads(world: int = 1) -> int:
    """Torch's intra-op threads for a CPU run: at most the CPUs this process may use (shared by
    ``world`` ranks on the machine), unless OMP_NUM_THREADS chose; returns the count. More
    threads than CPUs spin in OpenMP barriers and run many times slower."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, available_cpus() // max(world, 1))
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)

MALLOC_VARIABLES = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")
"""Variables (besides glibc's ``MALLOC_*``) by which a user chooses how CPU memory is allocated."""

_libc: ctypes.CDLL | None = None
"""glibc, once :func:`keep_freed_memory` applied its setting."""


def malloc_choice() -> str | None:
    """The environment variable by which the user chose how CPU memory is allocated, if any."""
    return next((k for k in sorted(os.environ) if k.startswith("MALLOC_") or k in MALLOC_VARIABLES), None)


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse, as a
    caching allocator would. By default it maps blocks above a threshold (at most 32 MiB; 3D
    activations of 16 channels at 64 x 32 x 32 and batch 8 are 33.5 MiB) afresh, unmaps them when
    freed and trims the heap, so each step faults its activations in again, zeroed: 40-240k faults
    and up to a third of a 3D fine-tuning step's time (benchmarks/RESULTS.md, "Page faults").
    :func:`release_freed_memory` bounds what a fragmented heap keeps resident. Skipped when the
    user chose (:func:`malloc_choice`) or the C library is not glibc; returns whether it applied."""
    global _libc
    if _libc is not None:
        return True
    if malloc_choice() is not None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return False
    _libc = libc if applied else None
    return _libc is not None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim) once
    :func:`keep_freed_memory` applied: the training loop calls it every ``RELEASE_EVERY`` steps
    and at the end of a stage, so memory that fragmentation left unused does not stay resident.
    The next step faults its working set in once."""
    if _libc is not None:
        _libc.malloc_trim(0)


class CachedSamples(torch.utils.data.Dataset):
    """A map-style dataset whose samples are kept in memory once read, up to ``budget`` bytes:
    the stages read the training split many times over and a phantom renders every sample
    anew (a batch of 16 at 64 x 64 costs about a tenth of a generator step). Samples must be
    deterministic per index and are shared, not copied: readers must not modify them in place
    (the DataLoader's collation stacks them into new tensors). Everything else is the wrapped
    dataset's."""

    def __init__(self, dataset: Any, budget: int = CACHE_BYTES) -> None:
        self.dataset, self.budget, self.used = dataset, budget, 0
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "cache", "budget", "used"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        keys = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            read = getattr(self.dataset, "__getitems__", None)
            items = read(missing) if read is not None else [self.dataset[k] for k in missing]
            fresh = dict(zip(missing, items))
            for k, item in fresh.items():
                size = sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
                if self.used + size <= self.budget:
                    self.cache[k], self.used = item, self.used + size
        else:
            fresh = {}
        return [self.cache[k] if k in self.cache else fresh[k] for k in keys]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]


def cacheable(dataset: Any) -> bool:
    """Whether a dataset's samples depend on the index alone: the built-in phantoms and folder
    datasets, and plugin datasets that say so with ``deterministic = True``."""
    from segcft.data._common import PhantomDataset
    from segcft.data.nifti import NiftiDataset
    from segcft.data.tiff import TiffDataset

    return (
        isinstance(dataset, PhantomDataset | NiftiDataset | TiffDataset)
        or getattr(dataset, "deterministic", False) is True
    )


class StageContext:
    """The state of one ``run_training`` call that the stages read; rank 0 writes, and every
    write ends with a barrier so that all ranks see it."""

    def __init__(self, cfg: Any, run: RunDir, d: Dist, device: torch.device, resume: bool, metrics: Any = None) -> None:
        self.cfg, self.run, self.d, self.device, self.resume = cfg, run, d, device, resume
        self.amp = device.type == "cuda" or (device.type == "cpu" and cfg.cpu_bf16)
        # metrics.csv's writer (a lane process passes one that relays rows to the main process)
        self.metrics: Any = metrics if metrics is not None else MetricsLog(run.metrics_csv, d.main, run.tensorboard)
        self.bars = True  # a progress bar on a terminal (lanes sharing one print plain lines)
        self.train_set = build_dataset(cfg, "train")
        if device.type == "cpu" and cacheable(self.train_set):  # a GPU run's loader workers would each copy it
            self.train_set = CachedSamples(self.train_set)
        self.info: DatasetInfo = self.train_set.info
        self.segmentor_checkpoint: Path | None = None
        self.segmentor_import: dict[str, torch.Tensor] | None = None  # its weights, read by validation
        self.clock: RunClock | None = None  # the run's time estimate, fed by every stage's steps

    def save_final(self, stage: str, state: dict[str, Any]) -> None:
        """Complete ``stage`` with its final checkpoint."""
        if self.d.main:
            self.run.save_final(stage, state)
        self.d.barrier()

    def save_last(self, stage: str, ts: TrainState) -> None:
        """Write the resume state of a running stage (collective: every rank calls it)."""
        state = capture_state(ts, stage, self.d)
        if state is not None:
            self.run.save_last(stage, state)
        self.d.barrier()

    def invalidate(self, stage: str, stale: bool = False) -> None:
        """Forget a stage's results so that it is trained again (its resume state survives when
        resuming, unless ``stale``: the redo then continues where it was interrupted)."""
        if self.d.main:
            self.run.invalidate(stage, keep_last=self.resume and not stale)
        self.d.barrier()

    def load_frozen(self, kind: str, stage: str) -> nn.Module:
        """The ``kind`` component trained by ``stage``, on the device, in eval mode, frozen."""
        return self._load_frozen(kind, stage)[0]

    def load_regressor(self) -> nn.Module:
        """The trained regressor, frozen, read through its calibration when
        ``cft.calibrate_regressor`` is on (segcft.models.calibration)."""
        from segcft.run import regressor_reader

        module, state = self._load_frozen("regressor", "regressor")
        reader = regressor_reader(module, state, self.cfg, self.info, self.run.final("regressor"))
        return reader.to(self.device).eval().requires_grad_(False)

    def _load_frozen(self, kind: str, stage: str) -> tuple[nn.Module, dict[str, Any]]:
        section = component_section(self.cfg, kind, stage)
        module = build_component(kind, section, self.info)
        path = self.run.final(stage)
        state = load_checkpoint(path)
        load_model_state(module, state, path, f"{kind} {section.name!r}")
        return module.to(self.device).eval().requires_grad_(False), state

    def curves(self) -> None:
        """Redraw the training curves from metrics.csv (rank 0)."""
        if self.d.main and self.run.metrics_csv.is_file():
            from segcft.figures import plot_training_curves

            plot_training_curves(self.run.metrics_csv, self.run.figures)
