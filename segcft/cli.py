"""The ``segcft`` command line (Click). Thin: parse arguments, build the config, call the library.

Library modules are imported inside the commands, so ``segcft --help``, ``segcft plugins`` and
``segcft list`` never import torch. Errors a user can cause print one line and exit with status
2; ``segcft --debug ...`` shows the traceback instead. The ``data`` subcommands live in
segcft/cli_data.py, helpers shared by the command modules in segcft/cli_base.py.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import click

from segcft import __version__
from segcft.cli_base import CommandUnavailable, _complete_names, _echo_json, _library, _UserFacing
from segcft.cli_data import data_group
from segcft.config import DEFAULT_PRESET, PRESETS
from segcft.errors import UserError
from segcft.protocols import KINDS

KIND_CHOICES = {f"{kind}s": kind for kind in KINDS}


def _cpu_memory_report() -> str:
    """One line for ``segcft doctor``: how CPU runs will allocate memory."""
    from segcft.train.context import malloc_choice

    choice = malloc_choice()
    if choice is not None:
        return f"CPU memory: as you set it ({choice}={os.environ[choice]}); CPU runs leave malloc alone"
    if platform.libc_ver()[0] != "glibc":
        return "CPU memory: the C library's default (not glibc)"
    unset = "no MALLOC_*, GLIBC_TUNABLES or THP_MEM_ALLOC_ENABLE set"
    return f"CPU memory: CPU runs keep freed memory in glibc's heap ({unset})"


class SegcftGroup(click.Group):
    """The root group: adds plugin subcommands on first use and turns UserError into one line."""

    _commands_for: object = None
    _plugin_commands: Mapping[str, click.Command | None] = MappingProxyType({})

    def _add_plugin_commands(self) -> None:
        """Let plugins add subcommands (again when the plugin manager was rebuilt); a broken
        plugin's commands are skipped with a warning (strict plugin mode: one line, exit 2)."""
        from segcft.plugins import add_plugin_commands, get_plugin_manager

        try:
            pm = get_plugin_manager()
        except UserError as exc:  # strict plugin loading, raised while Click parses arguments
            raise _UserFacing(" ".join(str(exc).split())) from exc
        if self._commands_for is pm:
            return
        for name, replaced in self._plugin_commands.items():
            if replaced is None:
                self.commands.pop(name, None)
            else:
                self.commands[name] = replaced
        before = dict(self.commands)
        self._commands_for = pm
        try:
            added = add_plugin_commands(self)
        except UserError as exc:
            self.commands.clear()
            self.commands.update(before)
            self._commands_for, self._plugin_commands = None, MappingProxyType({})
            raise _UserFacing(" ".join(str(exc).split())) from exc
        self._plugin_commands = {name: before.get(name) for name in added}

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        from segcft.plugins import PluginWarning

        previous = warnings.showwarning

        def show(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, PluginWarning):
                click.echo(f"Warning: {message}", err=True)
            else:
                previous(message, category, *rest, **kw)

        with warnings.catch_warnings():
            warnings.showwarning = show
            return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.params.get("debug"):
                raise
            raise _UserFacing(" ".join(str(exc).split())) from exc
        except Exception as exc:
            from segcft.plugins import FAILED_COMPONENT_ATTRIBUTE

            component = getattr(exc, FAILED_COMPONENT_ATTRIBUTE, None)
            if component is None or ctx.params.get("debug"):
                raise
            message = f"{component}: {type(exc).__name__}: {exc} (segcft --debug shows the traceback)"
            raise _UserFacing(" ".join(message.split())) from exc


@click.group(cls=SegcftGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="segcft")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
def cli(debug: bool) -> None:
    """segcft: segmentor-guided counterfactual fine-tuning of deep structural causal models.

    Components (datasets, generators, segmentors, regressors) and fine-tuning objectives come
    from plugins; see 'segcft plugins' and 'segcft list generators'.
    """


# -- plugins and components ------------------------------------------------------------------


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins: distribution, version, hooks and registered names."""
    from segcft.plugins import get_registry

    infos = get_registry().plugins
    if as_json:
        _echo_json([p.to_dict() for p in infos])
        return
    for p in infos:
        click.echo(f"{p.name} ({p.distribution} {p.version})")
        if p.error:
            click.echo(f"  skipped: {p.error}")
            continue
        click.echo(f"  hooks: {', '.join(p.hooks) or '-'}")
        for kind, names in p.registered.items():
            click.echo(f"  {kind}: {', '.join(names)}")


def _field_rows(config: type) -> list[dict[str, Any]]:
    from segcft.config import config_fields

    return config_fields(config)


def _generator_parameter_counts() -> Callable[[Any], str]:
    """A function giving the parameter count of a generator built for the default dataset."""
    cache: dict[str, Any] = {}

    def count(entry: Any) -> str:
        try:
            if "info" not in cache:
                from segcft.config import load_run_config
                from segcft.plugins import get_registry

                cfg = load_run_config()
                dataset = get_registry().get("dataset", cfg.dataset.name).load()(cfg.dataset.params, "train")
                cache["info"] = dataset.info
            model = entry.load()(entry.config(), cache["info"])
            return f"{sum(p.numel() for p in model.parameters()):,} (default config, {cache['info'].name})"
        except Exception as exc:  # informational only
            return f"unavailable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"

    return count


@cli.command("list")
@click.argument("kind", type=click.Choice(sorted(KIND_CHOICES)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show config fields (and generator parameter counts).")
def list_command(kind: str, as_json: bool, verbose: bool) -> None:
    """List registered components (or objectives) of one KIND with descriptions, dims and config
    fields; objectives also with what they need and use, in registration order (their seed order)."""
    from segcft.plugins import get_registry

    registry = get_registry()
    names = registry.ordered("objective") if kind == "objectives" else registry.names(KIND_CHOICES[kind])
    entries = [registry.get(KIND_CHOICES[kind], name) for name in names]
    count = _generator_parameter_counts() if verbose and kind == "generators" else None
    rows = []
    for e in entries:
        row: dict[str, Any] = {
            "name": e.name,
            "aliases": list(e.aliases),
            "plugin": e.plugin,
            "dims": list(e.dims),
            "description": e.description,
            "factory": e.factory_path,
            "config": _field_rows(e.config),
        }
        if kind == "objectives":
            row.update(needs=list(e.needs), uses=list(e.uses))
        if count is not None:
            row["parameters"] = count(e)
        rows.append(row)
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        dims = "/".join(f"{d}D" for d in row["dims"])
        click.echo(f"{row['name']}{aliases}  [{dims}, plugin {row['plugin']}]")
        if row["description"]:
            click.echo(f"    {row['description']}")
        if kind == "objectives" and (row["needs"] or row["uses"]):
            used = f"; uses {', '.join(row['uses'])} if configured" if row["uses"] else ""
            click.echo(f"    needs {', '.join(row['needs']) or 'nothing'}{used}")
        if verbose:
            if "parameters" in row:
                click.echo(f"    parameters: {row['parameters']}")
            for f in row["config"]:
                click.echo(f"    {f['name']}: {f['type']} = {f['default']!r}  {f['help']}")


# -- train / evaluate / counterfactual -----------------------------------------------------------


def _interventions(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> list[str]:
    for v in values:
        var, sep, val = v.partition("=")
        if not sep or not var.strip() or not val.strip():
            raise click.BadParameter(f"{v!r}: expected VAR=VALUE (VALUE: 12.5, +20%, -10% or x1.2)")
    return list(values)


@cli.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run config YAML (e.g. RUN/config.yaml of an earlier run).",
)
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default=DEFAULT_PRESET,
    show_default=True,
    help="Named preset applied under --config.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config value, e.g. --set generator.beta=2.0 (repeatable).",
)
@click.option(
    "--dataset", shell_complete=_complete_names("dataset"), help="Dataset plugin name (see 'segcft list datasets')."
)
@click.option(
    "--generator",
    shell_complete=_complete_names("generator"),
    help="Generator plugin name; its parameters reset to that plugin's defaults.",
)
@click.option("--segmentor", shell_complete=_complete_names("segmentor"), help="Segmentor plugin name.")
@click.option("--regressor", shell_complete=_complete_names("regressor"), help="Regressor plugin name.")
@click.option(
    "--cft",
    "cft_modes",
    multiple=True,
    metavar="MODE",
    shell_complete=_complete_names("objective"),
    help="Fine-tuning mode to train (repeatable; see 'segcft list objectives'); replaces cft.modes.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder [default: runs/<dataset>-<generator>-<time>].",
)
@click.option(
    "--resume",
    metavar="auto|PATH",
    help="Continue the run in --run-dir from its newest checkpoint (auto) or a checkpoint file. With no "
    "--preset/--config/--set/component/--seed/--cft option the run's own config.yaml is used; "
    "otherwise the resolved config must equal it, except device and evaluate.*.",
)
@click.option("--only", multiple=True, metavar="STAGE", help="Run only this stage (repeatable).")
@click.option("--from-stage", metavar="STAGE", help="Start at this stage, reusing earlier stages' checkpoints.")
@click.option(
    "--segmentor-checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Use this trained segmentor instead of training one.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Device (overrides config 'device').")
@click.option("--seed", type=int, help="Seed (overrides config 'seed').")
def train_command(
    config_file: Path | None,
    preset: str,
    overrides: tuple[str, ...],
    dataset: str | None,
    generator: str | None,
    segmentor: str | None,
    regressor: str | None,
    cft_modes: tuple[str, ...],
    run_dir: Path | None,
    resume: str | None,
    only: tuple[str, ...],
    from_stage: str | None,
    segmentor_checkpoint: Path | None,
    device: str | None,
    seed: int | None,
) -> None:
    """Train the causal model, the segmentor, the regressor, the generator and its fine-tuned
    variants; writes the run folder and prints the path of its report.

    Config merge order: preset <- --config <- component flags and --device/--seed/--cft <- --set.
    """
    from segcft.config import load_run_config
    from segcft.run import RunDir

    if resume is not None and run_dir is None:
        raise click.UsageError("--resume needs --run-dir (the run to continue)")
    components = {"dataset": dataset, "generator": generator, "segmentor": segmentor, "regressor": regressor}
    preset_given = click.get_current_context().get_parameter_source("preset") is not click.core.ParameterSource.DEFAULT
    run = RunDir(run_dir) if run_dir is not None else None
    own_config = (
        resume is not None
        and run is not None
        and run.is_run()
        and not preset_given
        and config_file is None
        and not overrides
        and not cft_modes
        and seed is None
        and all(v is None for v in components.values())
    )
    if own_config:
        assert run is not None
        cfg = run.read_config(f"config file {str(run.config)!r}")
        if device is not None:
            cfg.device = device  # type: ignore[assignment]  # a Choice of the same values
    else:
        cfg = load_run_config(
            config_file,
            preset,
            overrides,
            components=components,
            flags={"device": device, "seed": seed, "cft.modes": list(cft_modes) if cft_modes else None},
        )
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.dataset.name}-{cfg.generator.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_run_dir(run_dir)
    run_training = _library("segcft.train", "run_training", "train")
    run_training(
        cfg,
        run_dir,
        resume=resume,
        only=list(only) or None,
        from_stage=from_stage,
        segmentor_checkpoint=segmentor_checkpoint,
    )


def _check_run_dir(run_dir: Path) -> None:
    """UserError when the run folder cannot be created or written (checked before any work)."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UserError(f"--run-dir {run_dir}: exists and is not a folder")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise UserError(f"--run-dir {run_dir}: no permission to write in it")
        return
    ancestor = run_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--run-dir {run_dir}: cannot be created, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir}: cannot be created, no permission to write in {ancestor}")


_RUN_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@cli.command("evaluate")
@click.option("--run", "run_dir", type=_RUN_DIR, required=True, help="Run folder written by 'segcft train'.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option(
    "--n",
    type=click.IntRange(min=1),
    help="Number of subjects [default: the run config's evaluate.n; null there: the whole split].",
)
def evaluate_command(run_dir: Path, split: str, n: int | None) -> None:
    """Measure effectiveness, leakage, locality, composition and reversibility of every
    fine-tuning mode; writes metrics.json, report.md and figures/ in the run folder."""
    evaluate_run = _library("segcft.evaluate", "evaluate_run", "evaluate")
    evaluate_run(run_dir, split=split, n=n)
    from segcft.run import RunDir

    run = RunDir(run_dir)
    click.echo(f"metrics: {run.metrics_json}\nreport: {run.report}")


@cli.command("counterfactual")
@click.option("--run", "run_dir", type=_RUN_DIR, required=True, help="Run folder written by 'segcft train'.")
@click.option(
    "--input",
    "input_",
    required=True,
    metavar="FILE_OR_ID",
    help="An image file (.tif/.tiff, or .nii.gz/.nii for 3D runs: reoriented and resampled to the run's grid), "
    "a subject id of the run's folder dataset (an id of its attributes.csv, e.g. case_007), or a sample "
    "SPLIT:INDEX (e.g. test:0; a bare INDEX is a test sample unless it is a subject id).",
)
@click.option(
    "--do",
    "interventions",
    multiple=True,
    required=True,
    metavar="VAR=VALUE",
    callback=_interventions,
    help="Intervention (repeatable): absolute (12.5), relative (+20%, -10%) or a factor (x1.2).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output image, in the input's format (its suffix must say so: .tif/.tiff or .nii.gz/.nii), grid, "
    "units and dtype family; a subject id is written like its source file, a phantom sample as a float32 TIFF.",
)
@click.option(
    "--diff",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the difference map (counterfactual minus factual) in the output's format, units and grid.",
)
@click.option(
    "--png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a PNG: factual, counterfactual and their difference through the intervened structure "
    "(in 3D the section where it is largest).",
)
@click.option(
    "--particles",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="z samples averaged (more than 1 also gives an uncertainty map).",
)
@click.option(
    "--mode",
    default=None,
    metavar="MODE",
    help="Fine-tuned generator to use (none, reg, seg, pos-seg); default: the first of pos-seg, seg, "
    "reg, none that the run has.",
)
def counterfactual_command(
    run_dir: Path,
    input_: str,
    interventions: list[str],
    out: Path,
    diff: Path | None,
    png: Path | None,
    particles: int,
    mode: str | None,
) -> None:
    """Generate the counterfactual of one image under interventions on its variables, written
    in the input's format and geometry (NIfTI: same affine, shape and orientation, intensities
    through the inverse of the dataset's window; values the window clipped stay clipped)."""
    counterfactual = _library("segcft.evaluate", "counterfactual", "counterfactual")
    counterfactual(
        run_dir, input_, interventions, out, png=png, particles=particles, mode=mode, echo=click.echo, diff=diff
    )


# -- data (segcft/cli_data.py) -----------------------------------------------------------------

cli.add_command(data_group)


# -- doctor -------------------------------------------------------------------------------------


@cli.command("doctor")
def doctor_command() -> None:
    """Report versions, plugins and the kernel backend used on each device."""
    from segcft.plugins import get_registry

    click.echo(f"segcft {__version__}, Python {platform.python_version()} ({sys.executable})")
    try:
        import torch

        click.echo(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        click.echo(_cpu_memory_report())
    except ImportError as exc:
        click.echo(f"torch: not importable ({exc})")
    registry = get_registry()
    loaded = [p for p in registry.plugins if p.error is None]
    click.echo(f"plugins: {', '.join(f'{p.name} ({p.distribution} {p.version})' for p in loaded)}")
    for p in registry.plugins:
        if p.error is not None:
            click.echo(f"skipped plugin: {p.error}")
    try:
        backend_report = _library("segcft.ops", "backend_report", "doctor")
    except CommandUnavailable as exc:
        click.echo(f"kernels: unknown ({exc})")
        return
    click.echo(backend_report())


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``segcft``); exits with the command's status."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="segcft")


__all__ = ["CommandUnavailable", "SegcftGroup", "cli", "main"]
