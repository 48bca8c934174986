"""What every stage of a run shares: config, run folder, ranks, device, training split and
metrics log, and the rank-aware writes of stage results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component, build_dataset
from segcft.data.variables import DatasetInfo
from segcft.distributed import Dist
from segcft.run import RunDir
from segcft.train.metrics_log import MetricsLog
from segcft.train.resume import TrainState, capture_state

__all__ = ["StageContext"]


class StageContext:
    """The state of one ``run_training`` call that the stages read; rank 0 writes, and every
    write ends with a barrier so that all ranks see it."""

    def __init__(self, cfg: Any, run: RunDir, d: Dist, device: torch.device, resume: bool) -> None:
        self.cfg, self.run, self.d, self.device, self.resume = cfg, run, d, device, resume
        self.amp = device.type == "cuda" or (device.type == "cpu" and cfg.cpu_bf16)
        self.metrics = MetricsLog(run.metrics_csv, d.main, run.tensorboard)
        self.train_set = build_dataset(cfg, "train")
        self.info: DatasetInfo = self.train_set.info
        self.segmentor_checkpoint: Path | None = None
        self.segmentor_import: dict[str, torch.Tensor] | None = None  # its weights, read by validation

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
        section = getattr(self.cfg, kind)
        module = build_component(kind, section, self.info)
        path = self.run.final(stage)
        load_model_state(module, load_checkpoint(path), path, f"{kind} {section.name!r}")
        return module.to(self.device).eval().requires_grad_(False)

    def curves(self) -> None:
        """Redraw the training curves from metrics.csv (rank 0)."""
        if self.d.main and self.run.metrics_csv.is_file():
            from segcft.figures import plot_training_curves

            plot_training_curves(self.run.metrics_csv, self.run.figures)
