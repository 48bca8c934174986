"""The training pipeline behind ``segcft train``: every stage of a DSCM, its fine-tuned copies,
evaluation and report, in one resumable run folder (docs/design.md, "Run directory" and "Scale").

Stages (the table in ``stages.py``), in order: ``mechanisms`` (parent SCM) -> ``segmentor``
(the guide, seed s) and ``eval_segmentor`` (seed s+1, grades the guide's work) -> ``regressor``
-> ``generator`` (and eps, its training-set nelbo) -> ``cft-<mode>`` for every fine-tuning mode
-> ``evaluate`` (metrics.json, report.md, figures). A complete stage is skipped; ``only`` and
``from_stage`` redo chosen stages. Components come from the plugin registry by name; every
trained stage but ``mechanisms`` goes through the one loop in ``loop.py``. Under ``torchrun``
the stages run with DDP (NCCL on GPUs, gloo on CPUs); rank 0 writes.
"""

from segcft.run import Run, load_run
from segcft.train.pipeline import run_training
from segcft.train.stages import STAGE_TABLE, STAGES, Stage, stage_names

__all__ = ["STAGES", "STAGE_TABLE", "Run", "Stage", "load_run", "run_training", "stage_names"]
