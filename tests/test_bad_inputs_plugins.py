"""Broken plugins never take the CLI down: each bad plugin is a warning naming it (and the CLI keeps
working, ``--help`` included), one error line with exit status 2 under SEGCFT_STRICT_PLUGINS=1,
and one error line with exit status 2, not a traceback, when its component is used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from test_plugins import make_distribution

from segcft import plugins
from segcft.cli import cli
from segcft.plugins import PluginError, PluginWarning, load_registry

REPO = Path(__file__).resolve().parents[1]

HEADER = """
import click
import segcft
from dataclasses import dataclass

@dataclass
class Cfg:
    n: int = 1
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("SEGCFT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where ``install`` puts a distribution with a 'segcft' entry point."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def install(site: Path, module: str, source: str, monkeypatch) -> None:
    """Install ``module`` (with ``source``) as distribution bad-<module> 1.2.3 and load only it."""
    make_distribution(site, f"bad-{module}", module, HEADER + textwrap.dedent(source))
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", module)


def run(*args: str, strict: bool = False) -> Result:
    plugins.reset()
    env = {"SEGCFT_STRICT_PLUGINS": "1" if strict else None}
    return CliRunner().invoke(cli, list(args), prog_name="segcft", env=env)


def assert_warned_and_working(res: Result, *fragments: str) -> None:
    """Exit 0, no traceback, one warning line on stderr containing every fragment."""
    assert res.exit_code == 0, res.output
    assert res.exception is None and "Traceback" not in res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1, res.stderr
    for fragment in fragments:
        assert fragment in warnings[0], warnings[0]


def assert_one_line_error(res: Result, *fragments: str, warned: bool = False) -> None:
    """Exit 2 and a single 'Error: ...' line on stderr containing every fragment (after the
    loading warning when ``warned``)."""
    assert res.exit_code == 2, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    if warned:
        assert lines[0].startswith("Warning: "), res.stderr
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def check_warning_help_and_strict(*fragments: str) -> None:
    """The common checks: a normal command and --help work with a warning; strict mode is an error."""
    res = run("list", "generators")
    assert_warned_and_working(res, *fragments)
    assert "hvae" in res.stdout
    res = run("--help")
    assert_warned_and_working(res, *fragments)
    assert "train" in res.stdout and "Commands:" in res.stdout
    assert_one_line_error(run("list", "generators", strict=True), *fragments, "SEGCFT_STRICT_PLUGINS")
    assert_one_line_error(run("--help", strict=True), *fragments, "SEGCFT_STRICT_PLUGINS")


def test_sys_exit_on_import_is_a_failed_load(site, monkeypatch):
    """A plugin calling sys.exit(3) while imported: skipped with a warning (before: every command exited 3, silently)."""
    install(site, "exits_on_import", "import sys\nsys.exit(3)\n", monkeypatch)
    check_warning_help_and_strict("plugin 'exits_on_import' from distribution bad-exits_on_import 1.2.3",
                                  "failed to import: it called sys.exit(3)")


def test_sys_exit_on_import_through_the_console_entry_point(site):
    """The same plugin with ``python -m segcft``: the process exits 0 with output, not 3 without."""
    make_distribution(site, "bad-exits", "exits_sub", "import sys\nsys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "SEGCFT_LOAD_PLUGINS": "exits_sub"}
    env.pop("SEGCFT_STRICT_PLUGINS", None)
    res = subprocess.run([sys.executable, "-m", "segcft", "list", "generators"], capture_output=True, text=True,
                         env=env, cwd=REPO, check=False)
    assert res.returncode == 0 and "hvae" in res.stdout, res.stderr
    assert "Warning: plugin 'exits_sub'" in res.stderr and "sys.exit(3)" in res.stderr


def test_raising_on_import_is_a_failed_load(site, monkeypatch):
    """A plugin raising while imported: skipped with a warning naming it and the error."""
    install(site, "raises_on_import", "raise RuntimeError('no licence server')\n", monkeypatch)
    check_warning_help_and_strict("plugin 'raises_on_import'", "failed to import: RuntimeError: no licence server")


def test_keyboard_interrupt_on_import_still_stops_segcft(site, monkeypatch):
    """Ctrl-C while a plugin is imported is not swallowed as a broken plugin."""
    install(site, "interrupted", "raise KeyboardInterrupt\n", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        load_registry()


def test_entry_point_to_a_missing_module(site, monkeypatch):
    """An entry point naming a module that does not exist: a warning when loading; using one of
    its components names the skipped plugin in one line (exit 2)."""
    info = site / "bad_missing-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-missing\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[segcft]\nmissing_ep = no_such_module_for_segcft:plugin\n")
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "missing_ep")
    check_warning_help_and_strict("plugin 'missing_ep'", "ModuleNotFoundError", "no_such_module_for_segcft")
    res = run("train", "--preset", "smoke", "--generator", "broken")
    assert res.exit_code == 2
    assert "Error: --generator: generator: unknown generator 'broken'" in res.stderr
    assert "skipped because broken: plugin 'missing_ep'" in res.stderr and "Traceback" not in res.output


COMMANDS_RAISE = """
@segcft.hookimpl
def segcft_register_commands(cli):
    @cli.command("half-added")
    def half_added():
        click.echo("should not be reachable")

    raise RuntimeError("cannot add commands")
"""


def test_register_commands_raising(site, monkeypatch):
    """A segcft_register_commands hook that raises: warning, and none of its commands is kept
    (before: every command, --help included, ended in a traceback)."""
    install(site, "commands_raise", COMMANDS_RAISE, monkeypatch)
    check_warning_help_and_strict("plugin 'commands_raise' (bad-commands_raise 1.2.3) failed to add its commands",
                                  "RuntimeError: cannot add commands")
    assert "half-added" not in run("--help").stdout
    assert run("half-added").exit_code == 2


def test_register_commands_calling_sys_exit(site, monkeypatch):
    """A segcft_register_commands hook that calls sys.exit: a failed hook like any other."""
    source = "@segcft.hookimpl\ndef segcft_register_commands(cli):\n    raise SystemExit(4)\n"
    install(site, "commands_exit", source, monkeypatch)
    check_warning_help_and_strict("plugin 'commands_exit'", "failed to add its commands: it called sys.exit(4)")


CLASH = """
@segcft.hookimpl
def segcft_register_commands(cli):
    @cli.command("train")
    def train():
        click.echo("hijacked train")

    @cli.command("clash-extra")
    def extra():
        click.echo("extra works")
"""


def test_command_named_like_a_builtin_is_refused(site, monkeypatch):
    """A plugin command named like a built-in (train) is refused with a warning; its other
    commands are kept (before: the built-in was silently replaced)."""
    install(site, "clash_cmd", CLASH, monkeypatch)
    check_warning_help_and_strict("plugin 'clash_cmd'", "adds command 'train'", "already a built-in command",
                                  "segcft_override = True")
    res = run("train", "--help")
    assert_warned_and_working(res, "adds command 'train'")
    assert "Train the causal model" in res.stdout and "hijacked" not in res.output
    assert run("clash-extra").stdout == "extra works\n"


OVERRIDE = """
@segcft.hookimpl
def segcft_register_commands(cli):
    @cli.command("train")
    def train():
        '''A replacement train.'''
        click.echo("plugin train")

    train.segcft_override = True
"""


def test_explicit_override_of_a_builtin_command(site, monkeypatch):
    """A command marked ``segcft_override = True`` replaces the built-in on purpose: no warning,
    not even in strict mode; the built-in comes back once the plugin is gone."""
    install(site, "override_cmd", OVERRIDE, monkeypatch)
    for strict in (False, True):
        res = run("train", strict=strict)
        assert res.exit_code == 0 and res.stdout == "plugin train\n" and res.stderr == "", res.output
        res = run("--help", strict=strict)
        assert res.exit_code == 0 and "A replacement train." in res.stdout and res.stderr == ""
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    assert "Train the causal model" in run("train", "--help").stdout


def test_command_named_like_another_plugins_command_is_refused(site, monkeypatch):
    """Two plugins adding the same command name: the first one loaded keeps it, the second is refused."""
    for module in ("aa_first", "bb_second"):
        source = f"@segcft.hookimpl\ndef segcft_register_commands(cli):\n    @cli.command('shared')\n" \
                 f"    def shared():\n        click.echo('{module}')\n"
        install(site, module, source, monkeypatch)
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "aa_first,bb_second")
    res = run("shared")
    assert_warned_and_working(res, "plugin 'bb_second'", "adds command 'shared'",
                              "already a command of plugin 'aa_first' (bad-aa_first 1.2.3)")
    assert res.stdout == "aa_first\n"
    assert_one_line_error(run("shared", strict=True), "plugin 'bb_second'", "adds command 'shared'")


FACTORY_RAISES = """
def build(config, info):
    raise RuntimeError("factory exploded")

def build_data(config, split):
    raise RuntimeError("dataset factory exploded")

def build_exit(config, info):
    raise SystemExit(5)

@segcft.hookimpl
def segcft_register_generators(register):
    register("broken", build, config=Cfg)
    register("exits", build_exit, config=Cfg)

@segcft.hookimpl
def segcft_register_datasets(register):
    register("broken-data", build_data, config=Cfg, dims=(2,))
"""


def test_generator_factory_raising_at_build(site, monkeypatch, tmp_path):
    """A generator factory that raises when segcft train builds it: one line naming the plugin,
    the component and the error, exit 2 (before: a traceback, exit 1); --debug shows the traceback."""
    install(site, "factory_raises", FACTORY_RAISES, monkeypatch)
    args = ("train", "--preset", "smoke", "--generator", "broken", "--run-dir", str(tmp_path / "r"))
    res = run(*args)
    assert_one_line_error(res, "generator 'broken' (plugin factory_raises)", "RuntimeError: factory exploded")
    debug = run("--debug", *args)
    assert isinstance(debug.exception, RuntimeError)
    assert run("train", "--help").exit_code == 0


def test_dataset_factory_raising_at_build(site, monkeypatch, tmp_path):
    """A dataset factory that raises when segcft data export builds it: one line, exit 2."""
    install(site, "factory_raises_data", FACTORY_RAISES, monkeypatch)
    res = run("data", "export", "--dataset", "broken-data", "--out", str(tmp_path / "e"), "--n", "2")
    assert_one_line_error(res, "dataset 'broken-data' (plugin factory_raises_data)", "dataset factory exploded")


def test_factory_calling_sys_exit_at_build(site, monkeypatch):
    """A factory calling sys.exit is a PluginError naming the component, not an exit of segcft."""
    install(site, "factory_exits", FACTORY_RAISES, monkeypatch)
    _, registry = load_registry()
    entry = registry.get("generator", "exits")
    message = r"generator 'exits' \(plugin factory_exits\): the factory called sys.exit\(5\)"
    with pytest.raises(PluginError, match=message):
        entry.load()(entry.config(), None)


FACTORY_MODULE_MISSING = """
@segcft.hookimpl
def segcft_register_datasets(register):
    register("lost-data", "no_such_factory_module_xyz:build", config=Cfg, dims=(2,))
"""


def test_factory_module_missing(site, monkeypatch, tmp_path):
    """A 'module:attr' factory whose module is not installed: a warning when loading (strict: an
    error), and one line naming plugin and component when the component is used."""
    install(site, "factory_module_missing", FACTORY_MODULE_MISSING, monkeypatch)
    check_warning_help_and_strict("plugin 'factory_module_missing'", "registers dataset 'lost-data'",
                                  "module 'no_such_factory_module_xyz' is not installed")
    res = run("data", "export", "--dataset", "lost-data", "--out", str(tmp_path / "e"), "--n", "2")
    assert_one_line_error(res, "dataset 'lost-data' (plugin factory_module_missing): cannot import factory",
                          "ModuleNotFoundError", warned=True)


def test_loading_warnings_are_plugin_warnings(site, monkeypatch):
    """Library callers get PluginWarning (filterable), not printed text, for a skipped plugin."""
    install(site, "raises_for_library", "raise ValueError('bad')\n", monkeypatch)
    with pytest.warns(PluginWarning, match=r"'raises_for_library'.*ValueError: bad"):
        load_registry()


VANDAL = """
@segcft.hookimpl
def segcft_register_commands(cli):
    del cli.commands["doctor"]
    cli.commands["junk"] = "not a command"
"""


def test_commands_removed_or_not_click_commands(site, monkeypatch):
    """A hook that deletes a built-in command or adds something that is not a click.Command: the
    built-in comes back, the junk is dropped, --help still works; strict mode is an error."""
    install(site, "vandal_cmd", VANDAL, monkeypatch)
    res = run("--help")
    assert res.exit_code == 0 and "doctor" in res.stdout and "junk" not in res.stdout, res.output
    assert "removed command 'doctor'" in res.stderr and "adds 'junk' as str, not a click.Command" in res.stderr
    assert_one_line_error(run("--help", strict=True), "plugin 'vandal_cmd'", "removed command 'doctor'")
