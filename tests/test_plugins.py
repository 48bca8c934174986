"""Plugin manager and registry: hooks, lazy factories, collisions, broken plugins, entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import segcft
from segcft import plugins
from segcft.plugins import PluginError, PluginWarning, UnknownPluginError, load_registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "segcft-example"


@dataclass
class ToyConfig:
    width: int = field(default=3, metadata={"help": "toy width"})


def _factory(config: ToyConfig, info: object) -> tuple[str, int]:
    return ("built", config.width)


class InlinePlugin:
    """Implements every hook once."""

    @segcft.hookimpl
    def segcft_register_datasets(self, register):
        register("toy-data", "toy_missing_module_xyz:build", config=ToyConfig, dims=(2,), description="toy")

    @segcft.hookimpl
    def segcft_register_generators(self, register):
        register("toy-gen", _factory, config=ToyConfig, aliases=("tg",))

    @segcft.hookimpl
    def segcft_register_segmentors(self, register):
        register("toy-seg", _factory, config=ToyConfig, dims=(3,))

    @segcft.hookimpl
    def segcft_register_regressors(self, register):
        register("toy-reg", f"{__name__}:_factory", config=ToyConfig)

    @segcft.hookimpl
    def segcft_register_objectives(self, register):
        register("toy-cft", _factory, config=ToyConfig, needs=("segmentor",))

    @segcft.hookimpl
    def segcft_register_commands(self, cli):
        cli.commands_seen = True


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("SEGCFT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("SEGCFT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def _inline(*pairs):
    return load_registry(extra_plugins=pairs, entry_points=False)


def test_builtins_register_through_the_hooks():
    _, reg = _inline()
    assert {"cxr-phantom", "ccta-phantom", "tiff", "nifti"} <= set(reg.names("dataset"))
    hvae = reg.get("generator", "hvae")
    assert hvae.plugin == plugins.BUILTIN_PLUGIN and hvae.factory == "segcft.models.hvae:build"
    assert reg.get("dataset", "ccta-phantom").dims == (3,)
    builtin = reg.plugins[0]
    assert builtin.distribution == "segcft" and builtin.registered["segmentors"] == ["unet"]


def test_inline_plugin_every_hook_and_lazy_factories():
    with pytest.warns(PluginWarning, match=r"module 'toy_missing_module_xyz' is not installed"):
        pm, reg = _inline(("inline", InlinePlugin()))
    gen = reg.get("generator", "tg")  # alias
    assert gen.name == "toy-gen" and gen.plugin == "inline" and gen.dims == (2, 3)
    assert gen.load()(ToyConfig(width=5), None) == ("built", 5)
    assert reg.get("segmentor", "toy-seg").dims == (3,)
    assert reg.get("regressor", "toy-reg").load().__wrapped__ is _factory
    assert reg.get("objective", "toy-cft").needs == ("segmentor",)
    assert reg.ordered("objective") == ["none", "reg", "seg", "pos-seg", "toy-cft"]
    # a string factory is only imported on load: registering a missing module is fine
    with pytest.raises(ModuleNotFoundError):
        reg.get("dataset", "toy-data").load()

    class FakeCli:
        commands_seen = False

    cli = FakeCli()
    pm.hook.segcft_register_commands(cli=cli)
    assert cli.commands_seen
    info = [p for p in reg.plugins if p.name == "inline"][0]
    assert info.hooks == sorted([*plugins.HOOKS.values(), "segcft_register_commands"])


def test_registering_imports_no_torch():
    code = (
        "import sys; from segcft.plugins import get_registry; r = get_registry(); "
        "r.get('generator', 'hvae'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "SEGCFT_LOAD_PLUGINS": ""})


def test_unknown_name_suggests_close_matches():
    _, reg = _inline()
    with pytest.raises(UnknownPluginError, match=r"unknown generator 'hvea'; did you mean 'hvae'\?"):
        reg.get("generator", "hvea")
    with pytest.raises(UnknownPluginError, match=r"installed: ccta-phantom, cxr-phantom, nifti, tiff"):
        reg.get("dataset", "zzz")


class Clash:
    @segcft.hookimpl
    def segcft_register_generators(self, register):
        register("mine", _factory, config=ToyConfig)
        register("hvae", _factory, config=ToyConfig)


class Override:
    @segcft.hookimpl
    def segcft_register_generators(self, register):
        register("hvae", _factory, config=ToyConfig, override=True)


def test_collision_names_both_plugins_and_rolls_back():
    with pytest.warns(PluginWarning, match=r"'hvae' is registered twice: by plugin 'segcft.builtin' and by plugin 'clash'"):
        _, reg = _inline(("clash", Clash()))
    assert reg.get("generator", "hvae").plugin == plugins.BUILTIN_PLUGIN
    assert "mine" not in reg.names("generator")  # the failed plugin is skipped as a unit
    assert [p.error is not None for p in reg.plugins] == [False, True]


def test_collision_is_an_error_in_strict_mode(monkeypatch):
    monkeypatch.setenv("SEGCFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'segcft.builtin' and by plugin 'clash'"):
        _inline(("clash", Clash()))


def test_explicit_override_replaces():
    _, reg = _inline(("over", Override()))
    assert reg.get("generator", "hvae").plugin == "over"


class BadConfig:
    @segcft.hookimpl
    def segcft_register_segmentors(self, register):
        register("ok-seg", _factory, config=ToyConfig)
        register("bad-seg", _factory, config=dict)


class WrongApi:
    SEGCFT_PLUGIN_API_VERSION = 99

    @segcft.hookimpl
    def segcft_register_segmentors(self, register):
        register("future-seg", _factory, config=ToyConfig)


class Misspelled:
    @segcft.hookimpl
    def segcft_register_generator(self, register):  # missing "s"
        register("never", _factory, config=ToyConfig)


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (BadConfig(), r"config= must be a dataclass type"),
        (WrongApi(), r"built for segcft plugin API 99, but segcft .* provides API 1"),
        (Misspelled(), r"unknown hook 'segcft_register_generator'"),
    ],
)
def test_invalid_plugins_are_skipped_with_a_warning(plugin, message):
    with pytest.warns(PluginWarning, match=message):
        _, reg = _inline(("bad", plugin))
    assert {"ok-seg", "future-seg"}.isdisjoint(reg.names("segmentor"))
    assert reg.names("generator") == ["hvae"]


# -- entry points ------------------------------------------------------------------------------


def make_distribution(root: Path, dist: str, module: str, source: str) -> Path:
    """An installed-looking distribution (module + dist-info with a 'segcft' entry point)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[segcft]\n{module} = {module}\n")
    return root


GOOD = """
import segcft
from dataclasses import dataclass

@dataclass
class Cfg:
    n: int = 1

@segcft.hookimpl
def segcft_register_datasets(register):
    register("ep-data", "ep_good_mod:build", config=Cfg, dims=(2,))
"""
BROKEN = "raise ImportError('needs libfoo 9')\n"


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    make_distribution(root, "segcft-good", "ep_good_mod", GOOD)
    make_distribution(root, "segcft-broken", "ep_broken_mod", BROKEN)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_entry_points_load_and_broken_one_is_skipped(site):
    with pytest.warns(PluginWarning, match=r"'ep_broken_mod' from distribution segcft-broken 1.2.3 failed to import: "
                      r"ImportError: needs libfoo 9"):
        _, reg = load_registry()
    assert "ep-data" in reg.names("dataset")
    info = {p.name: p for p in reg.plugins}
    assert info["ep_good_mod"].distribution == "segcft-good" and info["ep_good_mod"].version == "1.2.3"
    assert info["ep_good_mod"].registered == {"datasets": ["ep-data"]}
    assert "ImportError" in info["ep_broken_mod"].error


def test_broken_entry_point_is_an_error_in_strict_mode(site, monkeypatch):
    monkeypatch.setenv("SEGCFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="segcft-broken"):
        load_registry()


@pytest.mark.parametrize(
    ("selection", "loaded"),
    [("", set()), ("segcft-good", {"ep_good_mod"}), ("ep_good_mod,other", {"ep_good_mod"})],
)
def test_load_plugins_selects_entry_points(site, monkeypatch, selection, loaded):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", selection)
    _, reg = load_registry()
    assert {p.name for p in reg.plugins} - {plugins.BUILTIN_PLUGIN} == loaded


def _segcft(args, env_extra, cwd=REPO):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "segcft", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_keeps_working_with_a_broken_plugin(site):
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    res = _segcft(["list", "datasets"], env)
    assert res.returncode == 0, res.stderr
    assert "ep-data" in res.stdout and "cxr-phantom" in res.stdout
    assert "Warning: plugin 'ep_broken_mod' from distribution segcft-broken" in res.stderr
    strict = _segcft(["list", "datasets"], {**env, "SEGCFT_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2
    assert strict.stderr.strip().count("\n") == 0 and "segcft-broken" in strict.stderr
    strict_help = _segcft(["--help"], {**env, "SEGCFT_STRICT_PLUGINS": "1"})
    assert strict_help.returncode == 2 and "Traceback" not in strict_help.stderr


@pytest.fixture(scope="session")
def example_site(tmp_path_factory):
    """plugins/segcft-example installed (with its entry point) into a private target folder."""
    target = tmp_path_factory.mktemp("example-site")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(EXAMPLE)]
    try:
        import setuptools  # noqa: F401

        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return target


def test_example_plugin_installs_and_is_listed(example_site):
    env = {"PYTHONPATH": f"{example_site}{os.pathsep}{REPO}"}
    res = _segcft(["plugins", "--json"], env)
    assert res.returncode == 0, res.stderr
    listed = {p["name"]: p for p in json.loads(res.stdout)}
    example = listed["example"]
    assert example["distribution"] == "segcft-example" and example["version"] == "0.1.0"
    assert example["registered"] == {
        "datasets": ["example-blobs"], "generators": ["example-cvae"], "segmentors": ["example-convnet"]
    }
    res = _segcft(["list", "datasets"], env)
    assert "example-blobs  [2D, plugin example]" in res.stdout
