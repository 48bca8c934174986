"""segcft: segmentor-guided counterfactual fine-tuning of deep structural causal models.

Importing the package is cheap (no torch): the CLI, the plugin registry and configs load
without it; models and ops import torch when used.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PLUGIN_API_VERSION = 1
"""Version of the hook and factory contracts; a plugin declares the version it was built for."""

hookimpl = pluggy.HookimplMarker("segcft")
"""Decorator for plugin hook implementations (plugins never import pluggy themselves)."""

__all__ = ["PLUGIN_API_VERSION", "__version__", "hookimpl"]
