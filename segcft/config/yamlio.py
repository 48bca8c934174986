"""Bounded safe YAML reading: config files and ``--set`` values are read with ``yaml.SafeLoader``
only, limited in size and in what their aliases may expand to (nothing is evaluated as code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from segcft.config.types import _quote, _short
from segcft.errors import ConfigError

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
