"""Plugin manager and the registry of component factories (hook specifications: segcft/hookspecs.py).

Components (datasets, generators, segmentors, regressors) and fine-tuning objectives are
registered by name through pluggy hooks; built-in ones (``segcft.builtin``) use exactly the same hooks as third-party
plugins found through the ``segcft`` entry-point group. Hooks receive a ``register`` callback
and record *factories*, never instances: a factory is a callable or a lazy ``"module:attr"``
string, so loading the registry imports neither torch nor model code.

Environment:
- ``SEGCFT_LOAD_PLUGINS=a,b`` loads only those entry-point plugins (by entry-point or
  distribution name); set but empty loads none. Built-in components always load.
- ``SEGCFT_STRICT_PLUGINS=1`` turns a plugin that fails to load or register (components or
  commands) into an error instead of a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from segcft import PLUGIN_API_VERSION, __version__, hookimpl
from segcft.errors import UserError
from segcft.hookspecs import HOOKS, PROJECT, SegcftHookSpecs, hookspec
from segcft.protocols import GUIDES, KINDS, OBJECTIVE_NEEDS

ENTRY_POINT_GROUP = "segcft"
BUILTIN_PLUGIN = "segcft.builtin"
API_VERSION_ATTRIBUTE = "SEGCFT_PLUGIN_API_VERSION"
"""Module attribute a plugin sets to the ``PLUGIN_API_VERSION`` it was built for."""
OVERRIDE_ATTRIBUTE = "segcft_override"
"""Attribute a plugin sets to True on a Click command that replaces a command of the same name on purpose."""
FAILED_COMPONENT_ATTRIBUTE = "segcft_failed_component"
"""Set on an exception raised while a third-party factory was imported or called: names the
plugin and component, so that the CLI can print one line instead of a traceback."""

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOOKS",
    "KINDS",
    "PROJECT",
    "Entry",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "Registry",
    "SegcftHookSpecs",
    "UnknownPluginError",
    "add_plugin_commands",
    "get_plugin_manager",
    "get_registry",
    "has_inline_plugins",
    "hookimpl",
    "hookspec",
    "load_registry",
    "reset",
]


class PluginError(UserError):
    """A plugin that cannot be loaded or registers something invalid (strict mode, or an
    explicit call that cannot continue)."""


class UnknownPluginError(UserError):
    """A component name that no installed plugin registered."""


class PluginWarning(UserWarning):
    """A plugin was skipped; the rest of segcft keeps working."""


def _mark(exc: Exception, component: str) -> None:
    """Record on ``exc`` which plugin component raised it; PluginError when it takes no attributes."""
    try:
        setattr(exc, FAILED_COMPONENT_ATTRIBUTE, component)
    except (AttributeError, TypeError):
        raise PluginError(f"{component}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, typed config class and lazy factory; an objective also
    declares what it ``needs`` (``OBJECTIVE_NEEDS``) and the guides it ``uses`` if the run names them."""

    kind: str
    name: str
    factory: str | Callable[..., Any]
    config: type
    dims: tuple[int, ...] = (2, 3)
    description: str = ""
    aliases: tuple[str, ...] = ()
    plugin: str = ""
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()

    def load(self) -> Callable[..., Any]:
        """The factory callable; a ``"module:attr"`` factory is imported now (not at registration).

        For a third-party plugin, an exception raised while importing or calling the factory
        keeps its type but is marked with ``FAILED_COMPONENT_ATTRIBUTE`` (the CLI prints it as
        one line naming plugin and component); a factory calling ``sys.exit`` raises PluginError."""
        if self.plugin == BUILTIN_PLUGIN:
            return self._import()
        label = f"{self.kind} {self.name!r} (plugin {self.plugin})"
        try:
            factory = self._import()
        except UserError:
            raise
        except SystemExit as exc:
            raise PluginError(
                f"{label}: importing factory {self.factory_path!r} called sys.exit({exc.code!r})"
            ) from None
        except Exception as exc:
            _mark(exc, f"{label}: cannot import factory {self.factory_path!r}")
            raise

        @functools.wraps(factory)
        def build(*args: Any, **kwargs: Any) -> Any:
            try:
                return factory(*args, **kwargs)
            except UserError:
                raise
            except SystemExit as exc:
                raise PluginError(f"{label}: the factory called sys.exit({exc.code!r})") from None
            except Exception as exc:
                _mark(exc, f"{label}: the factory failed")
                raise

        return build

    def _import(self) -> Callable[..., Any]:
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        module = importlib.import_module(module_name)
        try:
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(
                f"{self.kind} {self.name!r} (plugin {self.plugin}): factory {self.factory!r} does not exist"
            ) from None
        return obj

    @property
    def factory_path(self) -> str:
        """The factory as ``module:qualname`` text (for listings)."""
        if isinstance(self.factory, str):
            return self.factory
        return f"{getattr(self.factory, '__module__', '?')}:{getattr(self.factory, '__qualname__', repr(self.factory))}"


@dataclass
class PluginInfo:
    """A loaded (or skipped) plugin: where it comes from and what it registered."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``segcft plugins --json``)."""
        d: dict[str, Any] = {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": list(self.hooks),
            "registered": {k: list(v) for k, v in self.registered.items()},
        }
        if self.error is not None:
            d["error"] = self.error
        return d


class Registry:
    """Name -> ``Entry`` per component kind, with aliases and close-match suggestions, and the
    order in which names were first registered (an override keeps its name's place)."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._order: dict[str, list[str]] = {kind: [] for kind in KINDS}
        self.plugins: list[PluginInfo] = []

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {list(KINDS)}")

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind`` (without aliases), sorted."""
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def ordered(self, kind: str) -> list[str]:
        """Registered names of ``kind`` in the order they were first registered (built-ins first)."""
        self._check_kind(kind)
        return list(self._order[kind])

    def entries(self, kind: str) -> list[Entry]:
        """Registered entries of ``kind``, sorted by name."""
        return [self._entries[kind][n] for n in self.names(kind)]

    def resolve(self, kind: str, name: str) -> str:
        """Canonical name for ``name`` or one of its aliases; raises UnknownPluginError."""
        self._check_kind(kind)
        if name in self._entries[kind]:
            return name
        if name in self._aliases[kind]:
            return self._aliases[kind][name]
        known = sorted(self._entries[kind]) + sorted(self._aliases[kind])
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        installed = ", ".join(sorted(self._entries[kind])) or "none"
        skipped = [p.name for p in self.plugins if p.error is not None]
        if skipped:
            installed += f"; skipped because broken: plugin {', '.join(map(repr, skipped))}, see 'segcft plugins'"
        raise UnknownPluginError(f"unknown {kind} {name!r}{hint} (installed: {installed})")

    def get(self, kind: str, name: str) -> Entry:
        """The entry registered as ``name`` (or an alias of it) for ``kind``."""
        return self._entries[kind][self.resolve(kind, name)]

    def _owner(self, kind: str, name: str) -> Entry | None:
        return self._entries[kind].get(self._aliases[kind].get(name, name))

    def _commit(self, staged: Sequence[tuple[Entry, bool]]) -> None:
        """Add one plugin's entries, all or none: a collision without ``override`` raises and
        leaves the registry unchanged."""
        entries = {k: dict(v) for k, v in self._entries.items()}
        aliases = {k: dict(v) for k, v in self._aliases.items()}
        order = {k: list(v) for k, v in self._order.items()}
        try:
            for entry, override in staged:
                for key in (entry.name, *entry.aliases):
                    owner = self._owner(entry.kind, key)
                    if owner is None:
                        continue
                    if not override:
                        raise PluginError(
                            f"{entry.kind} name {key!r} is registered twice: by plugin {owner.plugin!r} and by "
                            f"plugin {entry.plugin!r} (pass override=True to register() to replace it on purpose)"
                        )
                    self._entries[owner.kind].pop(owner.name, None)
                    for alias in owner.aliases:
                        self._aliases[owner.kind].pop(alias, None)
                self._entries[entry.kind][entry.name] = entry
                for alias in entry.aliases:
                    self._aliases[entry.kind][alias] = entry.name
                if entry.name not in self._order[entry.kind]:
                    self._order[entry.kind].append(entry.name)
            self._order = {k: [n for n in v if n in self._entries[k]] for k, v in self._order.items()}
        except Exception:
            self._entries, self._aliases, self._order = entries, aliases, order
            raise


def _validate_needs(kind: str, where: str, aliases: Any, needs: Any, uses: Any) -> None:
    """What an objective declares it needs and uses; nothing for the other kinds."""
    if kind != "objective":
        if needs or uses:
            raise PluginError(f"{where}: only objectives take needs= and uses=")
        return
    if aliases:
        raise PluginError(f"{where}: objectives take no aliases (the name names the run's cft-<mode> stage)")
    for label, values, allowed in (("needs", needs, OBJECTIVE_NEEDS), ("uses", uses, GUIDES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise PluginError(f"{where}: {label}= takes {', '.join(map(repr, allowed))}, got {bad[0]!r}")


def _validate(kind: str, plugin: str, name: Any, factory: Any, config: Any, dims: Any, aliases: Any) -> None:
    where = f"plugin {plugin!r} registering {kind} {name!r}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"{where}: the name must be lower-case letters, digits, '.', '_' or '-'")
    for alias in aliases:
        if not isinstance(alias, str) or not _NAME_RE.match(alias):
            raise PluginError(f"{where}: invalid alias {alias!r}")
    if isinstance(factory, str):
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", factory):
            raise PluginError(f"{where}: a factory string must look like 'package.module:function', got {factory!r}")
    elif not callable(factory):
        raise PluginError(f"{where}: the factory must be callable or a 'module:attr' string")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise PluginError(f"{where}: config= must be a dataclass type, got {config!r}")
    missing = [
        f.name
        for f in dataclasses.fields(config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise PluginError(f"{where}: every config field needs a default; {missing} have none")
    # imported at use: listing plugins needs no config schema
    from segcft.config.types import check_config_class

    try:
        check_config_class(config)
    except UserError as exc:
        raise PluginError(f"{where}: {exc}") from None
    if not dims or any(d not in (2, 3) for d in dims):
        raise PluginError(f"{where}: dims must be a non-empty subset of (2, 3), got {dims!r}")


def _make_register(kind: str, plugin: str, staged: list[tuple[Entry, bool]]) -> Callable[..., None]:
    def register(
        name: str,
        factory: str | Callable[..., Any],
        *,
        config: type,
        dims: Sequence[int] = (2, 3),
        description: str = "",
        aliases: Sequence[str] = (),
        override: bool = False,
        needs: Sequence[str] = (),
        uses: Sequence[str] = (),
    ) -> None:
        """Record ``factory`` under ``name``; ``override=True`` replaces an earlier registration.
        Objectives declare ``needs`` (``OBJECTIVE_NEEDS``) and the guides they ``uses`` if named."""
        aliases, needs, uses = tuple(aliases), tuple(needs), tuple(uses)
        _validate(kind, plugin, name, factory, config, tuple(dims), aliases)
        _validate_needs(kind, f"plugin {plugin!r} registering {kind} {name!r}", aliases, needs, uses)
        entry = Entry(kind, name, factory, config, tuple(sorted(set(dims))), description, aliases, plugin, needs, uses)
        staged.append((entry, override))

    return register


def _strict() -> bool:
    return os.environ.get("SEGCFT_STRICT_PLUGINS", "").strip().lower() not in ("", "0", "false", "no")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _selected(ep: importlib.metadata.EntryPoint) -> bool:
    wanted = os.environ.get("SEGCFT_LOAD_PLUGINS")
    if wanted is None:
        return True
    names = {_normalise(n) for n in wanted.split(",") if n.strip()}
    dist = ep.dist.name if ep.dist is not None else ""
    return _normalise(ep.name) in names or (bool(dist) and _normalise(dist) in names)


def _problem(registry: Registry, info: PluginInfo, message: str) -> None:
    info.error = message
    registry.plugins.append(info)
    if _strict():
        raise PluginError(f"{message} (SEGCFT_STRICT_PLUGINS is set)")
    warnings.warn(f"{message}; plugin skipped", PluginWarning, stacklevel=4)


def _failure(exc: BaseException) -> str:
    """``Type: message`` of an exception a plugin raised; a ``sys.exit`` call says so."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _label(info: PluginInfo) -> str:
    return f"plugin {info.name!r} ({' '.join(filter(None, (info.distribution, info.version)))})"


def _register_plugin(pm: pluggy.PluginManager, registry: Registry, plugin: Any, info: PluginInfo) -> None:
    """Register one plugin object and run its registration hooks; skip it as a unit on failure."""
    label = _label(info)
    declared = getattr(plugin, API_VERSION_ATTRIBUTE, PLUGIN_API_VERSION)
    if declared != PLUGIN_API_VERSION:
        _problem(
            registry,
            info,
            f"{label} was built for segcft plugin API {declared}, but segcft {__version__} provides API "
            f"{PLUGIN_API_VERSION}; install a version of {info.distribution} made for this segcft",
        )
        return
    try:
        pm.register(plugin, name=info.name)
        pm.check_pending()
    except Exception as exc:  # any plugin failure is reported, not fatal
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        _problem(registry, info, f"{label} failed validation: {exc}")
        return
    info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    staged: list[tuple[Entry, bool]] = []
    try:
        for kind in KINDS:
            caller = getattr(pm.hook, HOOKS[kind])
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=_make_register(kind, info.name, staged))
        registry._commit(staged)
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops segcft
        pm.unregister(plugin)
        _problem(registry, info, f"{label} failed to register: {_failure(exc) if isinstance(exc, SystemExit) else exc}")
        return
    for entry, _ in staged:
        info.registered.setdefault(entry.kind + "s", []).append(entry.name)
    registry.plugins.append(info)
    for entry, _ in staged:
        missing = _missing_module(entry.factory.partition(":")[0]) if isinstance(entry.factory, str) else None
        if missing is not None:
            _warn_or_raise(
                f"{label} registers {entry.kind} {entry.name!r} with factory {entry.factory!r}, but module "
                f"{missing!r} is not installed",
                f"using {entry.kind} {entry.name!r} will fail",
            )


def _missing_module(path: str) -> str | None:
    """The first module of the dotted ``path`` that is not installed, when that is certain without
    importing anything (a module is only looked up once its parent package is imported)."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in sys.modules:
            continue
        try:
            return name if importlib.util.find_spec(name) is None else None
        except ModuleNotFoundError:
            return name
        except (ImportError, ValueError):
            return None
    return None


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    unique = {(ep.dist.name if ep.dist else "", ep.name): ep for ep in eps}
    return [unique[k] for k in sorted(unique)]


def load_registry(
    extra_plugins: Iterable[tuple[str, Any]] = (), entry_points: bool = True
) -> tuple[pluggy.PluginManager, Registry]:
    """Build a fresh plugin manager and registry: built-ins, then entry points, then ``extra_plugins``
    (``(name, module_or_object)`` pairs, e.g. plugins defined inline in tests or notebooks)."""
    from segcft import builtin

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(SegcftHookSpecs)
    registry = Registry()
    _register_plugin(pm, registry, builtin, PluginInfo(BUILTIN_PLUGIN, "segcft", __version__))
    if entry_points:
        for ep in _entry_points():
            if not _selected(ep):
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "unknown"
            info = PluginInfo(ep.name, dist, version)
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a broken plugin must not break segcft
                _problem(
                    registry,
                    info,
                    f"plugin {ep.name!r} from distribution {dist} {version} failed to import: {_failure(exc)}",
                )
                continue
            _register_plugin(pm, registry, plugin, info)
    for name, plugin in extra_plugins:
        _register_plugin(pm, registry, plugin, PluginInfo(name, "(inline)", ""))
    return pm, registry


def _warn_or_raise(message: str, consequence: str) -> None:
    if _strict():
        raise PluginError(f"{message} (SEGCFT_STRICT_PLUGINS is set)")
    warnings.warn(f"{message}; {consequence}", PluginWarning, stacklevel=3)


def _restore(commands: dict[str, Any], before: dict[str, Any], name: str) -> None:
    if name in before:
        commands[name] = before[name]
    else:
        commands.pop(name)


def add_plugin_commands(cli: Any) -> frozenset[str]:
    """Run every plugin's ``segcft_register_commands`` hook on the Click group ``cli``, one plugin
    at a time in load order, and return the names of the commands they added or replaced.

    A plugin whose hook raises (or calls ``sys.exit``) keeps none of its commands. A command
    named like a built-in or an earlier plugin's command is refused unless the plugin set
    ``OVERRIDE_ATTRIBUTE`` (``segcft_override = True``) on it; commands a plugin removes come
    back, and what is not a click.Command is dropped. Each problem is a PluginWarning, or a
    PluginError when SEGCFT_STRICT_PLUGINS is set."""
    import click

    pm, registry = _ensure()
    infos = {p.name: p for p in registry.plugins}
    owners: dict[str, str] = {}
    for impl in pm.hook.segcft_register_commands.get_hookimpls():
        info = infos.get(impl.plugin_name)
        label = _label(info) if info is not None else f"plugin {impl.plugin_name!r}"
        before = dict(cli.commands)
        try:
            impl.function(cli=cli)
        except (Exception, SystemExit) as exc:  # KeyboardInterrupt still stops segcft
            cli.commands.clear()
            cli.commands.update(before)
            _warn_or_raise(f"{label} failed to add its commands: {_failure(exc)}", "its commands are skipped")
            continue
        for name in before.keys() - cli.commands.keys():
            cli.commands[name] = before[name]
            _warn_or_raise(f"{label} removed command {name!r}", "the command is kept")
        for name, command in list(cli.commands.items()):
            if before.get(name) is command:
                continue
            if not isinstance(command, click.Command):
                _restore(cli.commands, before, name)
                _warn_or_raise(
                    f"{label} adds {name!r} as {type(command).__name__}, not a click.Command", "it is skipped"
                )
                continue
            if name in before and getattr(command, OVERRIDE_ATTRIBUTE, False) is not True:
                _restore(cli.commands, before, name)
                owner = f"a command of {owners[name]}" if name in owners else "a built-in command"
                _warn_or_raise(
                    f"{label} adds command {name!r}, but {name!r} is already {owner} (a plugin sets "
                    f"{OVERRIDE_ATTRIBUTE} = True on its command to replace it on purpose)",
                    "the plugin's command is skipped",
                )
                continue
            owners[name] = label
    return frozenset(owners)


_STATE: dict[str, Any] = {}


def _ensure() -> tuple[pluggy.PluginManager, Registry]:
    if "registry" not in _STATE:
        pm, registry = load_registry(_STATE.get("extra", ()))
        _STATE["pm"], _STATE["registry"] = pm, registry
    return _STATE["pm"], _STATE["registry"]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return _ensure()[0]


def get_registry() -> Registry:
    """The process-wide registry of component factories (built on first use)."""
    return _ensure()[1]


def register_plugin(plugin: Any, name: str) -> None:
    """Add a plugin object (module, class or instance with hookimpls) to the process-wide registry."""
    _STATE.setdefault("extra", []).append((name, plugin))
    _STATE.pop("registry", None)
    _STATE.pop("pm", None)


def has_inline_plugins() -> bool:
    """Whether plugins were added with :func:`register_plugin` (a fresh process would lack them)."""
    return bool(_STATE.get("extra"))


def reset() -> None:
    """Forget the process-wide registry and inline plugins (it is rebuilt on next use)."""
    _STATE.clear()
