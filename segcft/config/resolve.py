"""Resolving a run config from its layers: presets (with their 3D overlay), ``--config`` files,
component flags and ``--set`` overrides; completeness, mode and round-trip checks; the stored
form (RUN/config.yaml) and which keys ``--resume auto`` may change."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from segcft import __version__
from segcft.config.apply import _apply_mapping, _registry
from segcft.config.schema import DEFAULT_PRESET, OVERLAY_3D, PRESETS, ComponentConfig, RunConfig
from segcft.config.types import (
    _check_bounds,
    _check_ranges,
    _coerce,
    _hints,
    _plain,
    _quote,
    _short,
    _unknown_key,
)
from segcft.config.yamlio import load_yaml_text, read_yaml
from segcft.errors import ConfigError, UserError
from segcft.protocols import COMPONENT_KINDS


def preset_path(name: str) -> Path:
    """Path of the named preset YAML; an unknown name is a ConfigError listing the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    return Path(__file__).parent.parent / "presets" / f"{name}.yaml"


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
        elif key == "eval_segmentor":
            _apply_eval_segmentor(cfg, value, path)
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


def _apply_eval_segmentor(cfg: RunConfig, values: Any, where: str) -> None:
    """Merge parameters of the evaluation segmentor into ``cfg.eval_segmentor`` (an empty mapping
    clears them: the guide's parameters again); they are checked against the segmentor component
    once every layer is in (:func:`component_section`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of the segmentor's parameters, got {_quote(values)}")
    if "name" in values:
        raise ConfigError(
            f"{where}.name: the evaluation segmentor is the segmentor component (segmentor.name) with other "
            f"parameters; set only those parameters here"
        )
    cfg.eval_segmentor = {**cfg.eval_segmentor, **{str(k): v for k, v in values.items()}} if values else {}


def component_section(cfg: RunConfig, kind: str, stage: str = "") -> ComponentConfig:
    """The ``kind`` component that ``stage`` trains and a run loads: the section of that kind, and for
    stage ``eval_segmentor`` the ``segmentor`` section with ``eval_segmentor``'s parameters on top."""
    if kind != "segmentor" or stage != "eval_segmentor" or not cfg.eval_segmentor:
        return getattr(cfg, kind)
    if not cfg.segmentor.name or cfg.segmentor.params is None:
        raise ConfigError("eval_segmentor: sets segmentor parameters, but no segmentor is chosen (segmentor.name)")
    params = _apply_mapping(copy.deepcopy(cfg.segmentor.params), cfg.eval_segmentor, "eval_segmentor")
    return ComponentConfig(cfg.segmentor.name, params)


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
        if cfg.eval_segmentor:
            params = component_section(cfg, "segmentor", "eval_segmentor").params
            cfg.eval_segmentor = {k: _plain(getattr(params, k)) for k in cfg.eval_segmentor}
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(set(cfg.cft.modes)) != len(cfg.cft.modes):
        raise ConfigError(f"{where}: cft.modes lists a mode twice: {list(cfg.cft.modes)}")
    return cfg


def dataset_function(dataset: str, name: str) -> Any:
    """The module-level function ``name`` next to the dataset plugin's factory (the convention
    for cheap, data-free descriptions such as ``dataset_info``), else None."""
    import importlib

    factory = _registry().get("dataset", dataset).factory
    module_name = factory.partition(":")[0] if isinstance(factory, str) else getattr(factory, "__module__", None)
    if not module_name:
        return None
    found = getattr(importlib.import_module(module_name), name, None)
    return found if callable(found) else None


def _dataset_info(cfg: RunConfig) -> Any:
    """The dataset's metadata (``DatasetInfo``) when its plugin module offers it cheaply through
    ``dataset_info(config)`` next to the factory (as the phantoms do), else None."""
    describe = dataset_function(cfg.dataset.name, "dataset_info")
    return describe(cfg.dataset.params) if describe is not None else None


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


RESUME_SAFE_KEYS: tuple[str, ...] = ("device", "evaluate.", "train.segmentor.gate")
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
        safe = ", ".join(k.rstrip(".") + (".*" if k.endswith(".") else "") for k in RESUME_SAFE_KEYS)
        raise ConfigError(
            f"--resume: the config differs from {source} in {shown}; resume with the run's own config "
            f"(no --preset/--config/--set/component flags, or the same ones) or start a new --run-dir "
            f"(only {safe} may change)"
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

    The overlay is applied on top of the base only when the resolved dataset is 3D (see
    :func:`dataset_dims`: its registered dims, or its plugin's ``dataset_dims(config)``); it may
    not choose the dataset itself.
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


def dataset_dims(name: str, params: Any) -> int | None:
    """The spatial dimensionality of dataset ``name`` with config ``params``, without building
    data: the registered ``dims`` when they are a single value, else what the plugin module's
    ``dataset_dims(config)`` says (e.g. ``spatial_dims`` of a tiff folder's dataset.yaml), else
    None (not known before the data is read)."""
    registered = tuple(_registry().get("dataset", name).dims)
    if len(registered) == 1:
        return int(registered[0])
    describe = dataset_function(name, "dataset_dims")
    return describe(params) if describe is not None else None


def is_3d_dataset(name: str, params: Any = None) -> bool:
    """True when dataset ``name`` with config ``params`` (None: its defaults) produces volumes
    (see :func:`dataset_dims`); decides whether a preset's ``when_3d`` overlay applies."""
    return dataset_dims(name, params if params is not None else _registry().get("dataset", name).config()) == 3


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
    if overlay is not None and cfg.dataset.name and is_3d_dataset(cfg.dataset.name, cfg.dataset.params):
        cfg = resolve(with_overlay=True)
    _check_complete(cfg, "config")
    check_modes(cfg)
    _fill_objective_settings(cfg)
    check_round_trip(cfg)
    return cfg


def _fill_objective_settings(cfg: RunConfig) -> None:
    """Give every mode of ``cfg.cft.modes`` whose objective has settings an explicit entry in
    ``cft.objectives`` (its defaults when no layer set one), so the dumped config carries them and
    wins over whatever the default preset sets when it is read back."""
    for mode in cfg.cft.modes:
        make: type = _registry().get("objective", mode).config
        has_fields = dataclasses.is_dataclass(make) and bool(dataclasses.fields(make))
        if mode not in cfg.cft.objectives and has_fields:
            cfg.cft.objectives[mode] = make()


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
