"""Loads the compiled kernel modules and records which backend each device uses, and why."""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch


class KernelFallbackWarning(RuntimeWarning):
    """The compiled kernels are unavailable; the ops run the pure-torch reference instead."""


@dataclass(frozen=True)
class Backend:
    """The kernel module for one device type (None: the reference is used) and the reason."""

    device: str
    module: ModuleType | None
    reason: str

    @property
    def name(self) -> str:
        """'segcft._C', 'segcft._C_cuda' or 'reference'."""
        return self.module.__name__ if self.module is not None else "reference"


def _import(name: str) -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return None, f"{name} could not be imported ({exc})"
    return module, f"{name} loaded from {module.__file__}"


@functools.cache
def cpu_backend() -> Backend:
    """The CPU backend: segcft._C when it imports, otherwise the reference."""
    module, reason = _import("segcft._C")
    if module is not None:
        reason += f"; instruction set {module.cpu_isa()}"
    return Backend("cpu", module, reason)


@functools.cache
def cuda_backend() -> Backend:
    """The CUDA backend: segcft._C_cuda when it imports, otherwise the reference."""
    module, reason = _import("segcft._C_cuda")
    return Backend("cuda", module, reason)


_warned: set[str] = set()


def warn_fallback(backend: Backend) -> None:
    """Warns once per device type that the reference replaces the missing kernels."""
    if backend.module is None and backend.device not in _warned:
        _warned.add(backend.device)
        warnings.warn(
            f"segcft.ops: {backend.reason}; {backend.device} tensors use the pure-torch reference "
            "(slower, stores the probability tensor). Run `python -m segcft.ops` for details.",
            KernelFallbackWarning,
            stacklevel=3,
        )


def for_tensor(t: torch.Tensor) -> Backend:
    """The backend that handles tensors on t's device (reference for other device types)."""
    if t.device.type == "cpu":
        return cpu_backend()
    if t.device.type == "cuda":
        return cuda_backend()
    return Backend(t.device.type, None, f"no kernels for device type {t.device.type!r}")


def backend_report() -> str:
    """Human-readable lines: torch build, CPU threads, and the backend of each device with why."""
    cpu = cpu_backend()
    lines = [
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} CPU threads",
        f"cpu:  {cpu.name}: {cpu.reason}",
    ]
    if not torch.cuda.is_available():
        lines.append("cuda: unused: torch sees no CUDA device")
    else:
        cuda = cuda_backend()
        lines.append(f"cuda: {cuda.name} on {torch.cuda.get_device_name()}: {cuda.reason}")
    return "\n".join(lines)
