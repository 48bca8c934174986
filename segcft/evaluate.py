"""The evaluation's public API under its historical name; the code lives in
:mod:`segcft.evaluation` (loop, score records, report writer, what-ifs)."""

from __future__ import annotations

from segcft.evaluation import (
    COMPOSITION_CYCLES,
    MODE_PREFERENCE,
    REFERENCES,
    ParsedIntervention,
    counterfactual,
    counterfactual_with,
    evaluate,
    evaluate_run,
    fmt,
    parse_intervention,
    write_report,
)

__all__ = [
    "COMPOSITION_CYCLES",
    "MODE_PREFERENCE",
    "REFERENCES",
    "ParsedIntervention",
    "counterfactual",
    "counterfactual_with",
    "evaluate",
    "evaluate_run",
    "fmt",
    "parse_intervention",
    "write_report",
]
