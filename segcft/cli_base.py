"""Helpers shared by the ``segcft`` command modules: one-line user errors and lazy library lookup.

Kept apart from segcft/cli.py so command modules (segcft/cli_data.py) can use them without
importing the root group (no import cycle).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

import click

from segcft.errors import UserError


class CommandUnavailable(UserError):
    """A command whose library function is not part of this installation."""


class _UserFacing(click.ClickException):
    exit_code = 2


def _library(module: str, attr: str, command: str) -> Callable[..., Any]:
    """``module.attr``, or CommandUnavailable when that module or function does not exist yet.

    Only the absence of the module itself is mapped; an import error inside it propagates."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise CommandUnavailable(
                f"'segcft {command}' is not available in this installation: module {module} is missing"
            ) from None
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise CommandUnavailable(
            f"'segcft {command}' is not available in this installation: {module}.{attr} is missing"
        )
    return fn


def _complete_names(kind: str) -> Callable[[click.Context, click.Parameter, str], list[str]]:
    """Shell completion of registered component names of ``kind``."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
        from segcft.plugins import get_registry

        return [n for n in get_registry().names(kind) if n.startswith(incomplete)]

    return complete


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
