"""Evaluation of a trained run (docs/method.md section 6) and single-image what-ifs.

``evaluate_run`` measures, for every fine-tuning mode and every intervened variable on a split,
effectiveness and leakage (soft areas of an evaluation segmentor trained apart from the guide,
the guide's own figure beside it), locality, the error against the exact counterfactual on
phantoms, composition and reversibility, each with a 95% bootstrap interval over subjects, and
writes ``metrics.json``, ``report.md`` and ``figures/``, with the checks that its numbers rest on
models that have learned: the generator's responsiveness, the regressor's correlation and
exact-counterfactual slope, and marks on numbers measured by a segmentor with a large floor.

``counterfactual`` answers one what-if for a TIFF file or a dataset sample and writes the
counterfactual in the input's dtype, intensity range and spacing.

Modules: ``loop`` (the evaluation loop), ``records`` (typed score records), ``report`` (the one
writer of metrics.json, report.md and the console headline), ``whatif`` (single what-ifs),
``measure`` (soft areas and structure masks), ``checks`` (responsiveness, regressor, floor marks,
warnings), ``quality`` (a segmentor's Dice and soft-area MAPE per structure: the training gate's
measure).
"""

from __future__ import annotations

from segcft.evaluation.loop import COMPOSITION_CYCLES, evaluate, evaluate_run
from segcft.evaluation.records import fmt
from segcft.evaluation.report import REFERENCES, console_headline, print_headline, write_report
from segcft.evaluation.whatif import (
    MODE_PREFERENCE,
    ParsedIntervention,
    counterfactual,
    counterfactual_with,
    parse_intervention,
)

__all__ = [
    "COMPOSITION_CYCLES",
    "MODE_PREFERENCE",
    "REFERENCES",
    "ParsedIntervention",
    "console_headline",
    "counterfactual",
    "counterfactual_with",
    "evaluate",
    "evaluate_run",
    "fmt",
    "parse_intervention",
    "print_headline",
    "write_report",
]
