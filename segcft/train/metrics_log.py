"""metrics.csv of a run (and TensorBoard scalars when tensorboard is installed)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from segcft.checkpoint import atomic_write_text

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append-only metrics.csv with a header that grows as stages log new keys (the file is
    rewritten atomically when it does), plus TensorBoard scalars under ``tensorboard`` when given
    and tensorboard is installed. A row torn by a kill mid-append is dropped (with a warning) and
    the file rewritten."""

    def __init__(self, path: Path, enabled: bool, tensorboard: Path | None = None) -> None:
        self.path, self.enabled = path, enabled
        self.columns: list[str] = ["stage", "step"]
        self.rows: list[dict[str, str]] = []
        self.tb: Any = None
        if not enabled:
            return
        if path.is_file():
            self._read()
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard))
            except ImportError:
                self.tb = None

    def _read(self) -> None:
        with open(self.path, newline="") as f:
            text = f.read()
        reader = csv.DictReader(text.splitlines(keepends=True))
        self.columns = list(reader.fieldnames or self.columns)
        rows = list(reader)
        # a complete row has one value per column; a torn last one may lack its line end
        self.rows = [r for r in rows if None not in r and None not in r.values()]
        if self.rows and self.rows[-1] is rows[-1] and not text.endswith("\n"):
            self.rows.pop()
        if len(self.rows) != len(rows):
            print(
                f"warning: {self.path}: dropped {len(rows) - len(self.rows)} torn row(s) left by an interrupted run",
                file=sys.stderr,
                flush=True,
            )
            self._rewrite()

    def drop_stage(self, stage: str, from_step: int = 0) -> None:
        """Forget rows of ``stage`` at or after ``from_step`` (a stage redone or resumed)."""
        if not self.enabled:
            return
        keep = [r for r in self.rows if not (r.get("stage") == stage and int(float(r.get("step") or 0)) >= from_step)]
        if len(keep) != len(self.rows):
            self.rows = keep
            self._rewrite()

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        """Append one row (rank 0 only; a no-op elsewhere)."""
        if not self.enabled:
            return
        row = {"stage": stage, "step": str(step), **{k: f"{v:.6g}" for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.is_file():
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
