"""Typed run configuration: dataclasses, YAML presets, ``--config`` files and ``--set`` overrides.

Merge order (later wins): dataclass defaults <- preset YAML (``segcft/presets/<name>.yaml``;
its ``when_3d`` section on top when the resolved dataset is 3D) <- ``--config FILE`` <- component
flags (``--generator NAME`` ...) and typed CLI flags <- ``--set key=value``. Every value is
type-checked against the dataclasses (and against the config class a plugin registered for its
component); unknown keys and wrong types raise ConfigError naming the source, the key and what
was expected. YAML is read with ``yaml.safe_load`` only: nothing in a config is evaluated as code.

Component sections are flat in YAML, ``generator: {name: hvae, beta: 2.0}``: every key but
``name`` is a field of the config class the plugin registered. Changing a component's name
resets its parameters to that plugin's defaults before later keys apply.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml

from segcft import __version__
from segcft.errors import ConfigError, UserError
from segcft.models.configs import MechanismsConfig

_FLOAT_LITERAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
DEFAULT_PRESET = "quick"
COMPONENTS: tuple[str, ...] = ("dataset", "generator", "segmentor", "regressor")
CFT_MODES: tuple[str, ...] = ("none", "reg", "seg", "pos-seg")
OVERLAY_3D = "when_3d"
"""Preset key of the overlay applied only when the resolved dataset is 3D (see :func:`read_preset`)."""

CFTMode = Literal["none", "reg", "seg", "pos-seg"]


@dataclass
class ComponentConfig:
    """A pluggable component: the registered ``name`` and its config dataclass instance."""

    name: str = ""
    params: Any = None


@dataclass
class StageConfig:
    """Optimisation settings of one training stage (AdamW with linear warm-up)."""

    steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"help": "samples per step (global, over all ranks)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate after warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    grad_clip: float = field(default=350.0, metadata={"help": "gradient-norm clip (0: off)"})
    grad_skip: float = field(
        default=0.0, metadata={"help": "skip updates whose gradient norm exceeds this, or is NaN (0: skip NaN only)"}
    )
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)"})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints (0: end of stage only)"})


@dataclass
class IntensityAugmentConfig:
    """Random global intensity changes of the segmentors' training images,
    x -> clamp(a (x + 1) - 1 + b, -1, 1) with |a - 1| <= scale and |b| <= shift per image, so
    that soft areas follow shape, not brightness: fine-tuning otherwise learns to move a guide's
    areas by shifting the whole image's intensity."""

    shift: float = field(default=0.1, metadata={"help": "largest |b| (images in [-1, 1]; 0: off)"})
    scale: float = field(default=0.1, metadata={"help": "largest |a - 1| (0: off)"})


@dataclass
class TrainConfig:
    """One ``StageConfig`` per pre-training stage, in pipeline order, and the segmentors'
    intensity augmentation."""

    mechanisms: StageConfig = field(default_factory=lambda: StageConfig(steps=2000, batch_size=256, lr=1e-3))
    segmentor: StageConfig = field(default_factory=StageConfig)
    regressor: StageConfig = field(default_factory=StageConfig)
    generator: StageConfig = field(default_factory=lambda: StageConfig(grad_skip=500.0, ema=0.999))
    segmentor_intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)


@dataclass
class CFTConfig:
    """Counterfactual fine-tuning (METHOD.md section 4): guidance modes and the Lagrangian."""

    modes: tuple[CFTMode, ...] = field(
        default=("none", "reg", "seg"), metadata={"help": "fine-tuning modes to train: none, reg, seg, pos-seg"}
    )
    steps: int = field(default=1000, metadata={"help": "fine-tuning steps per mode"})
    batch_size: int = field(default=16, metadata={"help": "samples per step"})
    lr: float = field(default=1e-4, metadata={"help": "generator learning rate"})
    lr_lagrange: float = field(default=1e-2, metadata={"help": "learning rate of the Lagrange multiplier"})
    damping: float = field(default=100.0, metadata={"help": "damping d of the constraint"})
    lambda_init: float = field(default=0.0, metadata={"help": "initial Lagrange multiplier (>= 0)"})
    penalty: Literal["l1", "l2", "huber"] = field(default="l1", metadata={"help": "rho of the area loss"})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold (normalised units)"})
    soft_labels: bool = field(default=False, metadata={"help": "measure non-intervened variables on x (amplification fix)"})
    seg_weight: float = field(default=1.0, metadata={"help": "weight of the segmentor (area) terms"})
    reg_weight: float = field(default=1.0, metadata={"help": "weight of the regressor terms"})


@dataclass
class EvaluateConfig:
    """Evaluation of the fine-tuned generators (METHOD.md section 5)."""

    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to evaluate"})
    n: int | None = field(default=None, metadata={"help": "number of subjects (null: the whole split)"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of the 95% intervals"})
    dilation: int = field(default=2, metadata={"help": "pixels the structure masks are dilated by for locality"})
    particles: int = field(default=1, metadata={"help": "z samples averaged per counterfactual"})


@dataclass
class RunConfig:
    """Everything that determines a run; written resolved to ``RUN/config.yaml``."""

    seed: int = field(default=0, metadata={"help": "seed of every random draw of the run"})
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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        if args:
            return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
        return "a list"
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

    def fail() -> ConfigError:
        hint = ' (quote it in YAML: "...")' if tp is str and isinstance(value, (int, float)) else ""
        return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{hint}")

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
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        elif args:
            if len(value) != len(args):
                raise fail()
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = list(value)
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return _apply_mapping(tp(), value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads exponents without a dot (1e-3) as text; accept plain decimal literals.
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(valid)})")


def _apply_mapping(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    """Set the fields of dataclass instance ``obj`` from ``values`` (type-checked, in place)."""
    hints = _hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in valid:
            raise _unknown_key(str(key), valid, where)
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
            _apply_mapping(getattr(obj, key), value, sub)
        else:
            setattr(obj, key, _coerce(value, tp, sub))
    return obj


# -- merging ---------------------------------------------------------------------------------


def _registry() -> Any:
    from segcft.plugins import get_registry

    return get_registry()


def _apply_component(section: ComponentConfig, kind: str, values: Any, where: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'name' and the {kind}'s parameters, got {values!r}")
    values = dict(values)
    if "name" in values:
        name = values.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected str, got {name!r}")
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
        if key in COMPONENTS:
            _apply_component(getattr(cfg, key), key, value, path)
        elif key in valid:
            current = getattr(cfg, key)
            if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
                _apply_mapping(current, value, path)
            else:
                setattr(cfg, key, _coerce(value, _hints(RunConfig)[key], path))
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
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. generator.beta=2.0")
    return key, value


def _override_value(cfg: RunConfig, key: str, text: str) -> Any:
    """A ``--set`` value: plain text for string fields, YAML (safe) for everything else."""
    if _expected_type(cfg, key) is str:
        return text
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}={text}: not a valid value ({exc.__class__.__name__})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe loader); a missing file or bad YAML is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections, got {type(data).__name__}")
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
    missing = [kind for kind in COMPONENTS if not getattr(cfg, kind).name]
    if missing:
        raise ConfigError(f"{where}: no component chosen for {', '.join(missing)} (set e.g. {missing[0]}.name)")
    dataset = registry.get("dataset", cfg.dataset.name)
    for kind in COMPONENTS[1:]:
        entry = registry.get(kind, getattr(cfg, kind).name)
        if not set(entry.dims) & set(dataset.dims):
            raise ConfigError(
                f"{where}: {kind} {entry.name!r} supports {'/'.join(f'{d}D' for d in entry.dims)} images but dataset "
                f"{dataset.name!r} is {'/'.join(f'{d}D' for d in dataset.dims)}"
            )
    aug = cfg.train.segmentor_intensity
    if aug.shift < 0 or not 0 <= aug.scale < 1:
        raise ConfigError(
            f"{where}: train.segmentor_intensity: expected shift >= 0 and 0 <= scale < 1, got shift={aug.shift}, scale={aug.scale}"
        )
    if cfg.cft.lambda_init < 0:
        raise ConfigError(f"{where}: cft.lambda_init must be >= 0, got {cfg.cft.lambda_init}")
    if len(set(cfg.cft.modes)) != len(cfg.cft.modes):
        raise ConfigError(f"{where}: cft.modes lists a mode twice: {list(cfg.cft.modes)}")
    return cfg


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
        if kind not in COMPONENTS:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {COMPONENTS}")
    override_items = [parse_override(text) + (text,) for text in overrides]

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
            _apply_layer(cfg, _nest(key, _override_value(cfg, key, raw)), f"--set {text}")
        return cfg

    cfg = resolve(with_overlay=False)
    if overlay is not None and cfg.dataset.name and is_3d_dataset(cfg.dataset.name):
        cfg = resolve(with_overlay=True)
    return _check_complete(cfg, "config")


def component_params(kind: str, name: str, overrides: Iterable[str] = ()) -> Any:
    """The config instance of one component (e.g. for ``segcft data export``) with ``key=value``
    overrides of its fields applied."""
    section = ComponentConfig()
    _apply_component(section, kind, {"name": name}, f"--{kind}")
    for text in overrides:
        key, raw = parse_override(text)
        holder = RunConfig(**{kind: section})
        value = _override_value(holder, f"{kind}.{key}", raw)
        _apply_component(section, kind, _nest(key, value), f"--set {text}")
    return section.params


def run_config_from_dict(d: Mapping[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from its plain-data form (the inverse of ``run_config_to_dict``)."""
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
    """Write the fully resolved config as YAML; ``segcft train --config PATH`` reproduces the run."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# segcft {__version__} resolved run config: every value of the run, nothing implied.\n"
        f"# Reproduce with: segcft train --config {p.name}\n"
    )
    body = yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False, default_flow_style=False)
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
