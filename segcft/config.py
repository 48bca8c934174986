"""Typed run configuration: dataclasses, YAML presets, ``--config`` files and ``--set`` overrides.

Merge order (later wins): dataclass defaults <- preset YAML (``segcft/presets/<name>.yaml``;
its ``when_3d`` section on top when the resolved dataset is 3D) <- ``--config FILE`` <- component
flags (``--generator NAME`` ...) and typed CLI flags <- ``--set key=value``. Every value is
type-checked against the dataclasses (and against the config class a plugin registered for its
component); unknown keys and wrong types raise ConfigError naming the source, the key and what
was expected. Fields declare their ranges in their metadata (``"ge"``, ``"gt"``, ``"le"``,
``"lt"``), floats must be finite, and the resolved config must read back equal from its YAML
form. Fine-tuning modes are the registered objectives' names (``"names"`` in a field's
metadata) with their settings in ``cft.objectives`` (``"configs"``); each mode is checked against
the dataset's metadata when its plugin offers it.
YAML is read with a bounded ``yaml.SafeLoader`` only: nothing in a config is evaluated as code.

Component sections are flat in YAML, ``generator: {name: hvae, beta: 2.0}``: every key but
``name`` is a field of the config class the plugin registered. Changing a component's name
resets its parameters to that plugin's defaults before later keys apply.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from segcft import __version__
from segcft.errors import ConfigError, UserError
from segcft.models.configs import MechanismsConfig
from segcft.protocols import COMPONENT_KINDS

_FLOAT_LITERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
DEFAULT_PRESET = "quick"
OVERLAY_3D = "when_3d"
"""Preset key of the overlay applied only when the resolved dataset is 3D (see :func:`read_preset`)."""


@dataclass
class ComponentConfig:
    """A pluggable component: the registered ``name`` and its config dataclass instance."""

    name: str = ""
    params: Any = None


SEED_MAX = 2**63 - 1
"""Largest run seed. The stages derive their seeds from it through :func:`derived_seed`, which
keeps every derived seed a valid torch seed."""


def derived_seed(value: int) -> int:
    """A seed derived from the run seed (``seed * 1000 + rank`` and the like) folded into torch's
    seed range [0, 2**64); seeds derived from run seeds below 2**54 are unchanged."""
    return value % 2**64


@dataclass
class StageConfig:
    """Optimisation settings of one training stage (AdamW with linear warm-up)."""

    steps: int = field(default=1000, metadata={"help": "optimiser steps", "ge": 1})
    batch_size: int = field(default=32, metadata={"help": "samples per step (global, over all ranks)", "ge": 1})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate after warm-up", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "ge": 0})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps", "ge": 0})
    grad_clip: float = field(default=350.0, metadata={"help": "gradient-norm clip (0: off)", "ge": 0})
    grad_skip: float = field(
        default=0.0,
        metadata={"help": "skip updates whose gradient norm exceeds this, or is NaN (0: skip NaN only)", "ge": 0},
    )
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)", "ge": 0, "lt": 1})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})
    checkpoint_every: int = field(
        default=500, metadata={"help": "steps between checkpoints (0: end of stage only)", "ge": 0}
    )


@dataclass
class MechanismsStageConfig:
    """Settings of the mechanisms stage: AdamW on random minibatches of the training parents,
    with no warm-up, EMA or intermediate checkpoint (the stage takes seconds; its gradient-norm
    clip is fixed at 10)."""

    steps: int = field(default=2000, metadata={"help": "optimiser steps", "ge": 1})
    batch_size: int = field(default=256, metadata={"help": "parent vectors per step", "ge": 1})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "ge": 0})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})


@dataclass
class IntensityAugmentConfig:
    """Random global intensity changes of the segmentors' training images,
    x -> clamp(a (x + 1) - 1 + b, -1, 1) with |a - 1| <= scale and |b| <= shift per image, so
    that soft areas follow shape, not brightness: fine-tuning otherwise learns to move a guide's
    areas by shifting the whole image's intensity."""

    shift: float = field(default=0.1, metadata={"help": "largest |b| (images in [-1, 1]; 0: off)", "ge": 0})
    scale: float = field(default=0.1, metadata={"help": "largest |a - 1| (0: off)", "ge": 0, "lt": 1})


@dataclass
class TrainConfig:
    """The settings of each pre-training stage, in pipeline order (the evaluation segmentor uses
    ``segmentor``'s), and the segmentors' intensity augmentation."""

    mechanisms: MechanismsStageConfig = field(default_factory=MechanismsStageConfig)
    segmentor: StageConfig = field(default_factory=StageConfig)
    regressor: StageConfig = field(default_factory=StageConfig)
    generator: StageConfig = field(default_factory=lambda: StageConfig(grad_skip=500.0, ema=0.999))
    segmentor_intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)


@dataclass
class CFTConfig:
    """Counterfactual fine-tuning: guidance modes, the Lagrangian and the optimiser of the
    fine-tuned generator (AdamW with betas (0.9, 0.9), like the generator stage)."""

    modes: tuple[str, ...] = field(
        default=("none", "reg", "seg"),
        metadata={"help": "fine-tuning modes to train (see 'segcft list objectives')", "names": "objective"},
    )
    objectives: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "settings of objectives that have their own: mode -> mapping", "configs": "objective"},
    )
    steps: int = field(default=1000, metadata={"help": "fine-tuning steps per mode", "ge": 1})
    batch_size: int = field(default=16, metadata={"help": "samples per step", "ge": 1})
    lr: float = field(default=1e-4, metadata={"help": "generator learning rate", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the generator", "ge": 0})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps", "ge": 0})
    grad_clip: float = field(default=350.0, metadata={"help": "gradient-norm clip (0: off)", "ge": 0})
    grad_skip: float = field(
        default=500.0,
        metadata={"help": "skip updates whose gradient norm exceeds this, or is NaN (0: skip NaN only)", "ge": 0},
    )
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)", "ge": 0, "lt": 1})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})
    checkpoint_every: int = field(
        default=500, metadata={"help": "steps between checkpoints (0: end of stage only)", "ge": 0}
    )
    lr_lagrange: float = field(default=1e-2, metadata={"help": "learning rate of the Lagrange multiplier", "gt": 0})
    damping: float = field(default=100.0, metadata={"help": "damping d of the constraint", "ge": 0})
    lambda_init: float = field(default=0.0, metadata={"help": "initial Lagrange multiplier (>= 0)", "ge": 0})
    penalty: Literal["l1", "l2", "huber"] = field(default="l1", metadata={"help": "rho of the area loss"})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold (normalised units)", "gt": 0})
    soft_labels: bool = field(
        default=False, metadata={"help": "measure non-intervened variables on x (amplification fix)"}
    )
    seg_weight: float = field(default=1.0, metadata={"help": "weight of the segmentor (area) terms", "gt": 0})
    reg_weight: float = field(default=1.0, metadata={"help": "weight of the regressor terms", "gt": 0})


@dataclass
class EvaluateConfig:
    """Evaluation of the fine-tuned generators."""

    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to evaluate"})
    n: int | None = field(default=None, metadata={"help": "number of subjects (null: the whole split)", "ge": 1})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of the 95% intervals", "ge": 1})
    dilation: int = field(
        default=2, metadata={"help": "pixels the structure masks are dilated by for locality", "ge": 0}
    )
    particles: int = field(default=1, metadata={"help": "z samples averaged per counterfactual", "ge": 1})


@dataclass
class RunConfig:
    """Everything that determines a run; written resolved to ``RUN/config.yaml``."""

    seed: int = field(
        default=0, metadata={"help": f"seed of every random draw of the run (0 to {SEED_MAX})", "ge": 0, "le": SEED_MAX}
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    dataset: ComponentConfig = field(default_factory=ComponentConfig)
    generator: ComponentConfig = field(default_factory=ComponentConfig)
    segmentor: ComponentConfig = field(default_factory=ComponentConfig)
    regressor: ComponentConfig = field(default_factory=ComponentConfig)
    mechanisms: MechanismsConfig = field(default_factory=MechanismsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cft: CFTConfig = field(default_factory=CFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# -- type checking -------------------------------------------------------------------------

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


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type ``tp``; raises ConfigError naming ``where``."""

    def fail(extra: str = "") -> ConfigError:
        hint = ' (quote it in YAML: "...")' if tp is str and isinstance(value, (int, float)) else ""
        return ConfigError(f"{where}: expected {_type_name(tp)}{extra}, got {_quote(value)}{hint}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise fail()
    if origin in (typing.Union, types.UnionType):
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
        raise fail()
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if origin is list and len(args) == 1:
            args = (args[0], Ellipsis)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise fail()
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail()
        value_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: expected text keys, got the key {_quote(k)}")
            out[k] = _coerce(v, value_tp, f"{where}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return _apply_mapping(typing.cast(Any, tp)(), value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise fail(" within the 64-bit range")
            return value
        raise fail()
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # YAML 1.1 reads exponents without a dot (1e-3) as text; accept plain decimal literals.
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise fail(" (finite)") from None
            if not math.isfinite(number):
                raise fail(" (finite)")
            return number
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


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


# -- merging ---------------------------------------------------------------------------------


def _registry() -> Any:
    from segcft.plugins import get_registry

    return get_registry()


def _apply_component(section: ComponentConfig, kind: str, values: Any, where: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'name' and the {kind}'s parameters, got {_quote(values)}")
    values = dict(values)
    if "name" in values:
        name = values.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected str, got {_quote(name)}")
        try:
            entry = _registry().get(kind, name)
        except UserError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if entry.name != section.name:
            section.name, section.params = entry.name, entry.config()
    if values and not section.name:
        raise ConfigError(f"{where}: set {kind} 'name' before its parameters ({', '.join(map(str, values))})")
    if values:
        _apply_mapping(section.params, values, where)


def _apply_layer(cfg: RunConfig, layer: Mapping[str, Any], where: str) -> None:
    """Merge one nested mapping into ``cfg`` (component sections by name, the rest by field)."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{where}: expected a mapping of config sections, got {type(layer).__name__}")
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in layer.items():
        path = f"{where}: {key}" if where else key
        if key in COMPONENT_KINDS:
            _apply_component(getattr(cfg, key), key, value, path)
        elif key in valid:
            current = getattr(cfg, key)
            if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
                _apply_mapping(current, value, path)
            else:
                coerced = _coerce(value, _hints(RunConfig)[key], path)
                _check_bounds(coerced, {f.name: f for f in dataclasses.fields(RunConfig)}[key].metadata, path)
                setattr(cfg, key, coerced)
        else:
            raise _unknown_key(str(key), valid, where or "config")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = dotted.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _expected_type(cfg: RunConfig, dotted: str) -> Any:
    """The declared type of ``dotted`` in ``cfg`` (None when it cannot be resolved)."""
    obj: Any = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(obj, ComponentConfig):
            if part == "name":
                return str if i == len(parts) - 1 else None
            obj = obj.params
        if obj is None or not dataclasses.is_dataclass(obj):
            return None
        hints = _hints(type(obj))
        if part not in hints:
            return None
        if i == len(parts) - 1:
            return hints[part]
        obj = getattr(obj, part)
    return None


def parse_override(text: str) -> tuple[str, str]:
    """``"key.sub=value"`` -> ``("key.sub", "value")``; raises ConfigError on bad syntax."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {_quote(text)}: expected key=value, e.g. generator.beta=2.0")
    return key, value


def _short(text: str) -> str:
    """``text`` cut to QUOTE_LIMIT characters, for error messages."""
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def _override_value(cfg: RunConfig, key: str, text: str) -> Any:
    """A ``--set`` value: plain text for string fields, YAML (safe, bounded) for everything else."""
    if _expected_type(cfg, key) is str:
        return text
    try:
        return load_yaml_text(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {_short(f'{key}={text}')}: not a valid value ({exc.__class__.__name__})") from None
    except ConfigError as exc:
        raise ConfigError(f"--set {_short(f'{key}={text}')}: {exc}") from None


YAML_MAX_BYTES = 1 << 20
"""Largest config file read (a resolved run config is a few kilobytes)."""
YAML_MAX_NODES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (against alias bombs)."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing documents whose aliases expand to more than YAML_MAX_NODES
    values or refer to themselves: a few lines of anchors can otherwise stand for billions of
    values that every later walk of the config would visit."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts
            raise ConfigError(
                f"line {node.start_mark.line + 1}: the integer {_short(node.value)} has too many digits"
            ) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError("a YAML alias refers to the collection that contains it")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes, active) + _expanded_size(v, sizes, active) for k, v in node.value)
    active.discard(key)
    if total > YAML_MAX_NODES:
        raise ConfigError(f"the YAML expands to more than {YAML_MAX_NODES} values through its aliases")
    sizes[key] = total
    return total


def load_yaml_text(text: str) -> Any:
    """YAML ``text`` read with the safe loader, bounded in what its aliases may expand to
    (ConfigError) ; bad YAML raises yaml.YAMLError."""
    return yaml.load(text, Loader=_BoundedLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe, bounded loader); a missing, unreadable, oversized or
    non-UTF-8 file, bad YAML or a document that is not a mapping is a ConfigError."""
    p = Path(path)
    name = _quote(str(p))
    try:
        with open(p, "rb") as f:
            raw = f.read(YAML_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError(f"config file {name} cannot be read: {exc.strerror}") from None
    if len(raw) > YAML_MAX_BYTES:
        raise ConfigError(f"config file {name} is larger than {YAML_MAX_BYTES} bytes; expected a YAML config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {name} is not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {name} is not valid YAML: {_short(' '.join(str(exc).split()))}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {name}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {name}: the YAML is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name}: expected a mapping of sections, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    """Path of the named preset YAML; an unknown name is a ConfigError listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    return Path(__file__).parent / "presets" / f"{name}.yaml"


def _check_complete(cfg: RunConfig, where: str) -> RunConfig:
    registry = _registry()
    missing = [kind for kind in COMPONENT_KINDS if not getattr(cfg, kind).name]
    if missing:
        raise ConfigError(f"{where}: no component chosen for {', '.join(missing)} (set e.g. {missing[0]}.name)")
    dataset = registry.get("dataset", cfg.dataset.name)
    for kind in COMPONENT_KINDS[1:]:
        entry = registry.get(kind, getattr(cfg, kind).name)
        if not set(entry.dims) & set(dataset.dims):
            raise ConfigError(
                f"{where}: {kind} {entry.name!r} supports {'/'.join(f'{d}D' for d in entry.dims)} images but dataset "
                f"{dataset.name!r} is {'/'.join(f'{d}D' for d in dataset.dims)}"
            )
    try:
        _check_ranges(cfg, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(set(cfg.cft.modes)) != len(cfg.cft.modes):
        raise ConfigError(f"{where}: cft.modes lists a mode twice: {list(cfg.cft.modes)}")
    return cfg


def _dataset_info(cfg: RunConfig) -> Any:
    """The dataset's metadata (``DatasetInfo``) when its plugin module offers it cheaply through
    ``dataset_info(config)`` next to the factory (as the phantoms do), else None."""
    import importlib

    factory = _registry().get("dataset", cfg.dataset.name).factory
    module_name = factory.partition(":")[0] if isinstance(factory, str) else getattr(factory, "__module__", None)
    if not module_name:
        return None
    describe = getattr(importlib.import_module(module_name), "dataset_info", None)
    return describe(cfg.dataset.params) if callable(describe) else None


def check_modes(cfg: RunConfig, where: str = "config") -> None:
    """Raise ConfigError when a fine-tuning mode of ``cfg`` cannot run on its dataset (what its
    objective registered it needs: structure variables, regions), as far as the dataset plugin
    tells without building data (see :func:`_dataset_info`)."""
    from segcft.objectives.modes import check_mode

    data_needs = {"structures", "regions"}
    if not any(data_needs & set(_registry().get("objective", m).needs) for m in cfg.cft.modes):
        return
    info = _dataset_info(cfg)
    if info is None:
        return

    try:
        for mode in cfg.cft.modes:
            check_mode(mode, info)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every field of dataclass ``obj`` (component sections flat, as in YAML)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if isinstance(value, ComponentConfig):
            out[f"{key}.name"] = value.name
            if value.params is not None:
                out.update(_flat(value.params, key + "."))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_flat(value, key + "."))
        else:
            out[key] = value
    return out


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between ``a`` and ``b`` (a list is not a tuple)."""
    fa, fb = _flat(a), _flat(b)
    return [k for k in list(fa) + [k for k in fb if k not in fa] if fa.get(k, ...) != fb.get(k, ...)]


RESUME_SAFE_KEYS: tuple[str, ...] = ("device", "evaluate.")
"""Keys (a trailing dot: a whole section) that ``--resume auto`` may change: they do not alter
what the training stages compute. Any other change is refused, as it would mix two runs."""


def resume_config(stored: RunConfig, new: RunConfig, source: str | Path) -> RunConfig:
    """``new`` when it differs from the ``stored`` config of the run being resumed only in
    RESUME_SAFE_KEYS; else a ConfigError listing the differing keys."""
    changed = [
        k
        for k in config_differences(stored, new)
        if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE_KEYS)
    ]
    if changed:
        shown = ", ".join(changed[:12]) + (f" and {len(changed) - 12} more" if len(changed) > 12 else "")
        raise ConfigError(
            f"--resume: the config differs from {source} in {shown}; resume with the run's own config "
            f"(no --preset/--config/--set/component flags, or the same ones) or start a new --run-dir "
            f"(only {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUME_SAFE_KEYS)} may change)"
        )
    return new


def check_round_trip(cfg: RunConfig, where: str = "config") -> str:
    """The YAML text of ``cfg``; ConfigError naming the keys when reading it back does not give
    ``cfg`` again (a value the config system cannot represent would otherwise fail only when a
    later command reads RUN/config.yaml)."""
    try:
        text = yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False, default_flow_style=False)
        back = run_config_from_dict(load_yaml_text(text), where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: cannot be written as YAML ({_short(' '.join(str(exc).split()))})") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: does not read back from its YAML form: {exc}") from None
    if back != cfg:
        raise ConfigError(
            f"{where}: does not read back from its YAML form; differing keys: "
            f"{', '.join(config_differences(cfg, back))}"
        )
    return text


def read_preset(name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The named preset's layers: its base mapping and its ``when_3d`` overlay (None if absent).

    The overlay is applied on top of the base only when the resolved dataset is registered for
    3D alone (its registry entry's ``dims`` is ``(3,)``); it may not choose the dataset itself.
    """
    path = preset_path(name)
    where = f"preset {name!r} ({path.name})"
    data = read_yaml(path)
    overlay = data.pop(OVERLAY_3D, None)
    if overlay is None:
        return data, None
    if not isinstance(overlay, dict):
        raise ConfigError(f"{where}: {OVERLAY_3D}: expected a mapping of config sections, got {overlay!r}")
    if "dataset" in overlay:
        raise ConfigError(f"{where}: {OVERLAY_3D} cannot set 'dataset': the overlay is chosen by the dataset")
    return data, overlay


def is_3d_dataset(name: str) -> bool:
    """True when the registered dataset ``name`` produces volumes only (registry ``dims == (3,)``)."""
    return tuple(_registry().get("dataset", name).dims) == (3,)


def load_run_config(
    config_file: str | Path | None = None,
    preset: str | None = DEFAULT_PRESET,
    overrides: Iterable[str] = (),
    components: Mapping[str, str | None] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Resolve a run config: defaults <- preset (<- its ``when_3d`` overlay if the resolved
    dataset is 3D) <- ``config_file`` <- ``components`` (kind -> name) and ``flags`` (dotted key
    -> typed value) <- ``overrides`` (``"key=value"`` strings).

    The dataset is known only once every layer is merged, so a preset with an overlay is resolved
    twice: once to find the dataset and, for a 3D one, again with the overlay under the later layers.
    """
    base, overlay = read_preset(preset) if preset is not None else ({}, None)
    file_layer = read_yaml(config_file) if config_file is not None else None
    for kind in components or {}:
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {COMPONENT_KINDS}")
    override_items = [(*parse_override(text), text) for text in overrides]

    def resolve(with_overlay: bool) -> RunConfig:
        cfg = RunConfig()
        if preset is not None:
            path = preset_path(preset)
            _apply_layer(cfg, base, f"preset {preset!r} ({path.name})")
            if overlay is not None:
                # Type-check the overlay on every run, so a broken preset fails in 2D runs too.
                checked = cfg if with_overlay else copy.deepcopy(cfg)
                _apply_layer(checked, overlay, f"preset {preset!r} ({path.name}): {OVERLAY_3D}")
        if file_layer is not None:
            _apply_layer(cfg, file_layer, f"config file {str(config_file)!r}")
        for kind, name in (components or {}).items():
            if name is not None:
                _apply_layer(cfg, {kind: {"name": name}}, f"--{kind}")
        for key, value in (flags or {}).items():
            if value is not None:
                _apply_layer(cfg, _nest(key, value), f"option {key}")
        for key, raw, text in override_items:
            _apply_layer(cfg, _nest(key, _override_value(cfg, key, raw)), f"--set {_short(text)}")
        return cfg

    cfg = resolve(with_overlay=False)
    if overlay is not None and cfg.dataset.name and is_3d_dataset(cfg.dataset.name):
        cfg = resolve(with_overlay=True)
    _check_complete(cfg, "config")
    check_modes(cfg)
    check_round_trip(cfg)
    return cfg


def component_params(kind: str, name: str, overrides: Iterable[str] = ()) -> Any:
    """The config instance of one component (e.g. for ``segcft data export``) with ``key=value``
    overrides of its fields applied."""
    section = ComponentConfig()
    _apply_component(section, kind, {"name": name}, f"--{kind}")
    for text in overrides:
        key, raw = parse_override(text)
        holder = RunConfig()
        setattr(holder, kind, section)
        value = _override_value(holder, f"{kind}.{key}", raw)
        _apply_component(section, kind, _nest(key, value), f"--set {_short(text)}")
    return section.params


_UNUSED_STORED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "mechanisms"): ("warmup", "grad_clip", "grad_skip", "ema", "checkpoint_every"),
}
"""Keys that earlier versions wrote to RUN/config.yaml although their stage never used them;
dropped when a stored config is read, so that older run folders still load."""


def run_config_from_dict(d: Mapping[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from its plain-data form (the inverse of ``run_config_to_dict``), as stored in
    RUN/config.yaml (keys of ``_UNUSED_STORED_KEYS`` are dropped)."""
    if isinstance(d, Mapping):
        d = copy.deepcopy(dict(d))
        for (section, stage), keys in _UNUSED_STORED_KEYS.items():
            block = d.get(section, {}).get(stage) if isinstance(d.get(section), Mapping) else None
            if isinstance(block, dict):
                for key in keys:
                    block.pop(key, None)
    cfg = RunConfig()
    _apply_layer(cfg, d, where)
    return _check_complete(cfg, where)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-data form (YAML/JSON safe); component sections are flat ``{name, **params}``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ComponentConfig):
            out[f.name] = {"name": value.name, **(_plain(value.params) if value.params is not None else {})}
        else:
            out[f.name] = _plain(value)
    return out


def dump_run_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the fully resolved config as YAML; ``segcft train --config PATH`` reproduces the run.
    A config that would not read back equal is refused (ConfigError) before anything is written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# segcft {__version__} resolved run config: every value of the run, nothing implied.\n"
        f"# Reproduce with: segcft train --config {p.name}\n"
    )
    body = check_round_trip(cfg)
    from segcft.checkpoint import atomic_write_text  # imports torch: only when a run is written

    atomic_write_text(p, header + body)
    return p


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
