"""The fine-tuning modes the plugin registry offers: their names, seeds, guides and the dataset
checks that their registered needs imply (torch-free, for the config system and the CLI)."""

from __future__ import annotations

from typing import Any

from segcft.errors import ConfigError
from segcft.plugins import get_registry
from segcft.protocols import GUIDES

__all__ = [
    "applicable_modes",
    "check_mode",
    "objective_guides",
    "objective_index",
    "objective_names",
    "objective_needs",
]

KIND = "objective"


def objective_names() -> list[str]:
    """Registered modes in registration order: the built-ins none, reg, seg, pos-seg first."""
    return get_registry().ordered(KIND)


def objective_index(mode: str) -> int:
    """The mode's place in registration order; stage ``cft-<mode>`` is seeded ``seed + 10 + index``
    (0..3 for the built-ins; plugin objectives follow in the order their plugins load)."""
    names = objective_names()
    if mode not in names:
        raise ConfigError(f"cft.modes: unknown fine-tuning mode {mode!r}; expected one of {names}")
    return names.index(mode)


def check_mode(mode: str, info: Any) -> None:
    """Raise ConfigError with one line when ``mode`` is not registered or its objective needs
    something the dataset (``DatasetInfo``) lacks: structure variables or regions."""
    objective_index(mode)
    needs = get_registry().get(KIND, mode).needs
    if "structures" in needs and not info.structure_variables:
        raise ConfigError(f"cft.modes: {mode!r} needs structure variables; dataset {info.name!r} has none")
    if "regions" in needs and not info.regions:
        raise ConfigError(f"cft.modes: {mode!r} needs a dataset with regions; dataset {info.name!r} has none")


def applicable_modes(info: Any, has_regressor: bool = True) -> list[str]:
    """The modes that make sense for a dataset: their needs are met, a regressor among them only
    when ``has_regressor``, and regions only when some structure variable is measured per region."""
    regional = any(v.measure and v.measure.region for v in info.structure_variables)
    modes = []
    for mode in objective_names():
        needs = get_registry().get(KIND, mode).needs
        try:
            check_mode(mode, info)
        except ConfigError:
            continue
        if ("regressor" in needs and not has_regressor) or ("regions" in needs and not regional):
            continue
        modes.append(mode)
    return modes


def objective_needs(mode: str) -> tuple[str, ...]:
    """What the objective of ``mode`` declared it needs (guides, structures, regions)."""
    return tuple(get_registry().get(KIND, mode).needs)


def objective_guides(mode: str, cfg: Any) -> list[str]:
    """The frozen guides (``segmentor``, ``regressor``, in that order) to load for ``mode`` under
    run config ``cfg``: those its objective needs, and those it uses when ``cfg`` names one."""
    entry = get_registry().get(KIND, mode)
    return [kind for kind in GUIDES if kind in entry.needs or (kind in entry.uses and getattr(cfg, kind).name)]
