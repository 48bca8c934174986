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

Layout: ``schema`` the dataclasses and constants; ``types`` type and range checking of values;
``yamlio`` bounded safe YAML reading; ``resolve`` presets, layers, ``--set``, resume and the
stored form. This package re-exports their public names; importing it does not import torch.
"""

from __future__ import annotations

from segcft.config.resolve import (
    RESUME_SAFE_KEYS,
    check_modes,
    check_round_trip,
    component_params,
    component_section,
    config_differences,
    dump_run_config,
    is_3d_dataset,
    load_run_config,
    parse_override,
    preset_path,
    read_preset,
    resume_config,
    run_config_from_dict,
    run_config_to_dict,
)
from segcft.config.schema import (
    DEFAULT_PRESET,
    OVERLAY_3D,
    PRESETS,
    SEED_MAX,
    CFTConfig,
    ComponentConfig,
    EvaluateConfig,
    IntensityAugmentConfig,
    MechanismsConfig,
    MechanismsStageConfig,
    RunConfig,
    SegmentorStageConfig,
    StageConfig,
    TrainConfig,
    derived_seed,
)
from segcft.config.types import (
    QUOTE_LIMIT,
    check_config_class,
    config_fields,
)
from segcft.config.yamlio import (
    YAML_MAX_BYTES,
    YAML_MAX_NODES,
    load_yaml_text,
    read_yaml,
)

__all__ = [
    "DEFAULT_PRESET",
    "OVERLAY_3D",
    "PRESETS",
    "QUOTE_LIMIT",
    "RESUME_SAFE_KEYS",
    "SEED_MAX",
    "YAML_MAX_BYTES",
    "YAML_MAX_NODES",
    "CFTConfig",
    "ComponentConfig",
    "EvaluateConfig",
    "IntensityAugmentConfig",
    "MechanismsConfig",
    "MechanismsStageConfig",
    "RunConfig",
    "SegmentorStageConfig",
    "StageConfig",
    "TrainConfig",
    "check_config_class",
    "check_modes",
    "check_round_trip",
    "component_params",
    "component_section",
    "config_differences",
    "config_fields",
    "derived_seed",
    "dump_run_config",
    "is_3d_dataset",
    "load_run_config",
    "load_yaml_text",
    "parse_override",
    "preset_path",
    "read_preset",
    "read_yaml",
    "resume_config",
    "run_config_from_dict",
    "run_config_to_dict",
]
