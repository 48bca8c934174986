"""Type and range checking of config values against the dataclasses' annotations: scalars,
``Literal``, unions, lists, tuples, ``dict[str, X]`` and nested dataclasses; ranges declared in
field metadata; registered names and per-name configs; which config classes a plugin may
register (``check_config_class``); plain-data form and field listings of a config class."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from segcft.config.schema import ComponentConfig
from segcft.errors import ConfigError

_FLOAT_LITERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NONE_TYPE = type(None)
_INT64 = (-(2**63), 2**63 - 1)
_BOUNDS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}
"""Range keys a config field may declare in its metadata, e.g. ``metadata={"help": ..., "ge": 1}``;
they apply to a number, or to every number inside a list, tuple or mapping value."""
QUOTE_LIMIT = 200
"""Characters of a value that an error message quotes at most."""


def _quote(value: Any) -> str:
    """``repr(value)`` cut to QUOTE_LIMIT characters, for error messages."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def _short(text: str) -> str:
    """``text`` cut to QUOTE_LIMIT characters, for error messages."""
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is list and len(args) == 1:
            return f"a list of {_type_name(args[0])}"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        if args:
            return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
        return "a list"
    if origin is dict:
        args = typing.get_args(tp)
        return f"a mapping of str to {_type_name(args[1])}" if len(args) == 2 else "a mapping"
    if tp is _NONE_TYPE:
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def _mismatch(value: Any, tp: Any, where: str, extra: str = "") -> ConfigError:
    """The ConfigError for ``value`` not being of type ``tp`` at ``where``."""
    hint = ' (quote it in YAML: "...")' if tp is str and isinstance(value, (int, float)) else ""
    return ConfigError(f"{where}: expected {_type_name(tp)}{extra}, got {_quote(value)}{hint}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type ``tp``; raises ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise _mismatch(value, tp, where)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin in (tuple, list):
        return _coerce_sequence(value, tp, where)
    if origin is dict:
        return _coerce_dict(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _mismatch(value, tp, where)
        return _apply_fields(typing.cast(Any, tp)(), value, where)
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the first member of the union ``tp`` it checks against (None for ``X | None``)."""
    args = typing.get_args(tp)
    if value is None and _NONE_TYPE in args:
        return None
    for arg in args:
        if arg is _NONE_TYPE:
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            continue
    raise _mismatch(value, tp, where)


def _coerce_sequence(value: Any, tp: Any, where: str) -> Any:
    """A YAML list as ``tp`` (``list[X]``, ``tuple[X, ...]`` or a fixed-length tuple), item by item."""
    origin = typing.get_origin(tp)
    if not isinstance(value, (list, tuple)):
        raise _mismatch(value, tp, where)
    args = typing.get_args(tp)
    if origin is list and len(args) == 1:
        args = (args[0], Ellipsis)
    if len(args) == 2 and args[1] is Ellipsis:
        items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif args:
        if len(value) != len(args):
            raise _mismatch(value, tp, where)
        items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
        items = list(value)
    return tuple(items) if origin is tuple else items


def _coerce_dict(value: Any, tp: Any, where: str) -> dict[str, Any]:
    """A YAML mapping as ``dict[str, X]``: text keys, every value checked against ``X``."""
    if not isinstance(value, Mapping):
        raise _mismatch(value, tp, where)
    value_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: expected text keys, got the key {_quote(k)}")
        out[k] = _coerce(v, value_tp, f"{where}.{k}")
    return out


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """``value`` as bool, a 64-bit int, a finite float, str, or an instance of the class ``tp``."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise _mismatch(value, tp, where, " within the 64-bit range")
            return value
        raise _mismatch(value, tp, where)
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # YAML 1.1 reads exponents without a dot (1e-3) as text; accept plain decimal literals.
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _mismatch(value, tp, where, " (finite)") from None
            if not math.isfinite(number):
                raise _mismatch(value, tp, where, " (finite)")
            return number
        raise _mismatch(value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(value, tp, where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _mismatch(value, tp, where)


def _numbers(value: Any) -> Iterable[tuple[str, Any]]:
    """``(suffix, number)`` for a number and for every number inside a list, tuple or mapping."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield "", value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from ((f"[{i}]{s}", n) for s, n in _numbers(v))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from ((f".{k}{s}", n) for s, n in _numbers(v))


def _check_bounds(value: Any, metadata: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError when ``value`` (or a number inside it) breaks a declared range."""
    declared = [(key, metadata[key]) for key in _BOUNDS if key in metadata]
    if not declared:
        return
    for suffix, number in _numbers(value):
        for key, bound in declared:
            if not _BOUNDS[key][1](number, bound):
                wanted = " and ".join(f"{_BOUNDS[k][0]} {b}" for k, b in declared)
                raise ConfigError(f"{where}{suffix}: expected a value {wanted}, got {_quote(number)}")


def _check_ranges(obj: Any, where: str) -> None:
    """Check every declared range of dataclass instance ``obj`` and of the dataclasses in it."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        sub = f"{where}.{f.name}" if where else f.name
        _check_bounds(value, f.metadata, sub)
        if isinstance(value, ComponentConfig):
            if value.params is not None:
                _check_ranges(value.params, sub)
            continue
        for item in (
            value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]
        ):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                _check_ranges(item, sub)


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {_quote(key)}{hint} (valid keys: {', '.join(valid)})")


def _apply_fields(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    """Set the fields of dataclass instance ``obj`` (a value inside a container, e.g. an item of a
    ``list[SomeConfig]`` field) from ``values``, type- and range-checked. Registered names and
    per-name plugin configs are section-level fields, applied by ``segcft.config.apply``."""
    hints = _hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), where)
        sub = f"{where}.{key}" if where else key
        if "names" in fields[key].metadata or "configs" in fields[key].metadata:
            raise ConfigError(f"{sub}: registered names are config section fields, not items of a container")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            _apply_fields(getattr(obj, key), value, sub)
            continue
        coerced = _coerce(value, hints[key], sub)
        _check_bounds(coerced, fields[key].metadata, sub)
        setattr(obj, key, coerced)
    return obj


def _supported(tp: Any, seen: tuple[type, ...] = ()) -> str | None:
    """None when values of type ``tp`` can be checked, written to YAML and read back; else why not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (bool, int, float, str, _NONE_TYPE):
        return None
    if origin is Literal:
        bad = [a for a in args if not isinstance(a, (bool, int, str))]
        return f"Literal values must be str, int or bool, not {bad[0]!r}" if bad else None
    if origin in (typing.Union, types.UnionType):
        return next((why for why in (_supported(a, seen) for a in args) if why), None)
    if origin is list:
        return _supported(args[0], seen) if len(args) == 1 else "list needs one item type, e.g. list[int]"
    if origin is tuple:
        if not args:
            return "tuple needs item types, e.g. tuple[int, ...]"
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        return next((why for why in (_supported(a, seen) for a in items) if why), None)
    if origin is dict:
        if len(args) != 2 or args[0] is not str:
            return "dict needs text keys, e.g. dict[str, float]"
        return _supported(args[1], seen)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp in seen:
            return f"{tp.__name__} contains itself"
        try:
            check_config_class(tp, _seen=(*seen, tp))
        except ConfigError as exc:
            return str(exc)
        return None
    shown = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    return (
        f"{shown} cannot be written to YAML and read back (use bool, int, float, str, list, "
        "tuple, dict[str, ...], Literal, X | None or a dataclass)"
    )


def check_config_class(cls: type, *, _seen: tuple[type, ...] = ()) -> None:
    """Raise ConfigError naming the field when ``cls`` (a config dataclass) has a field whose type
    the config system cannot check and round-trip through YAML, a field without a default, or a
    default that is not of its type or breaks its declared range."""
    name = getattr(cls, "__qualname__", repr(cls))
    try:
        hints = _hints(cls)
    except Exception as exc:  # an unresolvable annotation names no field otherwise
        raise ConfigError(
            f"config class {name}: its field types cannot be resolved ({type(exc).__name__}: {exc})"
        ) from None
    for f in dataclasses.fields(cls):
        where = f"config class {name}, field {f.name!r}"
        why = _supported(hints[f.name], _seen or (cls,))
        if why:
            raise ConfigError(f"{where}: {why}")
        unknown = [
            k for k in ("gt", "ge", "lt", "le") if k in f.metadata and not isinstance(f.metadata[k], (int, float))
        ]
        if unknown:
            raise ConfigError(f"{where}: the range {unknown[0]!r} must be a number")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise ConfigError(f"{where}: every config field needs a default")
        plain = _plain(default)
        try:
            checked = _coerce(plain, hints[f.name], "default")
            _check_bounds(checked, f.metadata, "default")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if checked != default:
            raise ConfigError(
                f"{where}: the default {_quote(default)} reads back as {_quote(checked)} from YAML "
                f"(declare the type it is, e.g. tuple rather than list)"
            )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_fields(cls: type) -> list[dict[str, Any]]:
    """``[{name, type, default, help}]`` of a config dataclass (for listings and docs)."""
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append(
            {
                "name": f.name,
                "type": _type_name(hints.get(f.name, Any)),
                "default": _plain(default),
                "help": f.metadata.get("help", ""),
            }
        )
    return rows
