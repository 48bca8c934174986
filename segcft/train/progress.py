"""Progress of a running stage: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """tqdm bar on a terminal (rank 0), a log line every ``every`` steps otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool, every: int) -> None:
        self.stage, self.total, self.every, self.enabled = stage, total, max(every, 1), enabled
        self.bar: Any = None
        self.t0, self.s0 = time.perf_counter(), start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = {k: logs[k] for k in list(logs)[:4]}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.stage}] step {step}/{self.total} {text} ({rate:.2f} steps/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
