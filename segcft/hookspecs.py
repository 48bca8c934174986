"""The pluggy hook specifications of segcft: the hooks a plugin may implement.

Kept apart from segcft/plugins.py (the plugin manager and registry) so the contract a plugin
author reads is one short file. ``HOOKS`` maps each component kind to its registration hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from segcft.protocols import KINDS

PROJECT = "segcft"
HOOKS: dict[str, str] = {kind: f"segcft_register_{kind}s" for kind in KINDS}

hookspec = pluggy.HookspecMarker(PROJECT)


class SegcftHookSpecs:
    """The hooks a plugin may implement (decorate implementations with ``segcft.hookimpl``)."""

    @hookspec
    def segcft_register_datasets(self, register: Callable[..., None]) -> None:
        """Register dataset factories ``build(config, split) -> Dataset``."""

    @hookspec
    def segcft_register_generators(self, register: Callable[..., None]) -> None:
        """Register generator factories ``build(config, info) -> nn.Module`` (Generator protocol)."""

    @hookspec
    def segcft_register_segmentors(self, register: Callable[..., None]) -> None:
        """Register segmentor factories ``build(config, info) -> nn.Module`` (Segmentor protocol)."""

    @hookspec
    def segcft_register_regressors(self, register: Callable[..., None]) -> None:
        """Register regressor factories ``build(config, info) -> nn.Module`` (Regressor protocol)."""

    @hookspec
    def segcft_register_objectives(self, register: Callable[..., None]) -> None:
        """Register fine-tuning objectives ``build(config, ctx: ObjectiveContext) -> CFTObjective``
        (``segcft.objectives.base``) named as ``cft.modes``; ``register`` also takes ``needs``, ``uses``."""

    @hookspec
    def segcft_register_commands(self, cli: Any) -> None:
        """Add Click subcommands to the ``segcft`` command group ``cli``."""
