"""`python -m segcft.ops`: which kernel backend each device uses, and why."""

from __future__ import annotations

import sys

from segcft.ops import backend_report, cpu_backend


def main() -> int:
    """Prints the backend per device type; returns 1 when the CPU kernels are missing."""
    print(backend_report())
    return 0 if cpu_backend().module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
