"""Config classes of the built-in objectives (torch-free: the registry imports them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["NoSettings"]


@dataclass
class NoSettings:
    """An objective without settings of its own: the built-ins read theirs from the ``cft`` section."""
