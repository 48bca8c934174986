"""Config values applied to config objects: mappings onto dataclass instances (type- and
range-checked), registered names and per-name plugin configs looked up in the plugin registry."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from segcft.config.types import _check_bounds, _coerce, _hints, _quote, _unknown_key
from segcft.errors import ConfigError


def _apply_mapping(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    """Set the fields of dataclass instance ``obj`` from ``values`` (type- and range-checked, in place)."""
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), where)
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            _apply_mapping(getattr(obj, key), value, sub)
        elif "configs" in fields[key].metadata:
            setattr(obj, key, _apply_configs(getattr(obj, key), value, fields[key].metadata["configs"], sub))
        else:
            coerced = _coerce(value, tp, sub)
            _check_bounds(coerced, fields[key].metadata, sub)
            if "names" in fields[key].metadata:
                _check_names(coerced, fields[key].metadata["names"], sub)
            setattr(obj, key, coerced)
    return obj


def _check_names(values: Sequence[str], kind: str, where: str) -> None:
    """Raise ConfigError when an item of ``values`` is not a registered name of ``kind`` (listed
    in registration order; aliases are not accepted)."""
    known = _registry().ordered(kind)
    for i, value in enumerate(values):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}[{i}]: expected one of {', '.join(map(repr, known))}, got {_quote(value)}{hint} "
                f"(see 'segcft list {kind}s')"
            )


def _apply_configs(current: Mapping[str, Any], values: Any, kind: str, where: str) -> dict[str, Any]:
    """``current`` (name -> config instance of the registered ``kind`` of that name) updated from
    ``values`` (name -> mapping of that config's fields)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {kind} name to its settings, got {_quote(values)}")
    known = _registry().ordered(kind)
    out = dict(current)
    for name, settings in values.items():
        sub = f"{where}.{name}"
        if name not in known:
            raise ConfigError(f"{sub}: unknown {kind} {_quote(name)} (registered: {', '.join(known)})")
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{sub}: expected a mapping of the {kind}'s settings, got {_quote(settings)}")
        params = copy.deepcopy(out[name]) if name in out else _registry().get(kind, name).config()
        out[name] = _apply_mapping(params, settings, sub)
    return out


def _registry() -> Any:
    """The plugin registry (imported at use: ``segcft.plugins`` imports ``segcft.config.types``)."""
    from segcft.plugins import get_registry

    return get_registry()
