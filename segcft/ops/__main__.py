"""`python -m segcft.ops`: which kernel backend each device uses, and why."""

from __future__ import annotations

import sys

import torch

from segcft.ops import cpu_backend, cuda_backend


def main() -> int:
    """Prints the backend per device type; returns 1 when the CPU kernels are missing."""
    cpu = cpu_backend()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {torch.get_num_threads()} CPU threads")
    print(f"cpu:  {cpu.name}: {cpu.reason}")
    if not torch.cuda.is_available():
        print("cuda: unused: torch sees no CUDA device")
    else:
        cuda = cuda_backend()
        name = torch.cuda.get_device_name()
        print(f"cuda: {cuda.name} on {name}: {cuda.reason}")
    return 0 if cpu.module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
