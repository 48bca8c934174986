"""Components of a run (dataset, generator, segmentor, regressor) built from the plugin
registry by the names in the run config."""

from __future__ import annotations

from typing import Any

from torch import nn

from segcft.data.variables import DatasetInfo

__all__ = ["build_component", "build_dataset", "registry_entry"]


def registry_entry(kind: str, section: Any) -> Any:
    """The registry entry of the plugin named in a config section (``section.name``)."""
    from segcft.plugins import get_registry

    return get_registry().get(kind, section.name)


def build_component(kind: str, section: Any, info: DatasetInfo) -> nn.Module:
    """A generator, segmentor or regressor built by its plugin from a config section."""
    return registry_entry(kind, section).load()(section.params, info)


def build_dataset(cfg: Any, split: str) -> Any:
    """One split of the run config's dataset, built by its plugin."""
    return registry_entry("dataset", cfg.dataset).load()(cfg.dataset.params, split)
