"""The ``segcft data`` commands: check, measure, export and show datasets (added to the root
group in segcft/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from segcft.cli_base import _complete_names, _library


@click.group("data")
def data_group() -> None:
    """Check, measure, export and show datasets."""


@data_group.command("check")
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
def data_check(dataset: Path) -> None:
    """Check a dataset folder against the dataset contract; lists every problem and exits 2 when there are any."""
    check_dataset = _library("segcft.data.tools", "check_dataset", "data check")
    problems = check_dataset(dataset)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {dataset}", err=True)
        sys.exit(2)
    click.echo(f"{dataset}: ok")


@data_group.command("measure")
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV of the measured structure variables.",
)
def data_measure(dataset: Path, out: Path) -> None:
    """Measure the structure variables (areas/volumes) of a dataset from its masks."""
    measure_dataset = _library("segcft.data.tools", "measure_dataset", "data measure")
    measure_dataset(dataset, out)
    click.echo(f"wrote {out}")


@data_group.command("export")
@click.option(
    "--dataset",
    "name",
    required=True,
    shell_complete=_complete_names("dataset"),
    help="Dataset plugin name (e.g. a phantom).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Number of samples.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field of the dataset's config, e.g. --set size=128 (repeatable).",
)
def data_export(name: str, out: Path, n: int, overrides: tuple[str, ...]) -> None:
    """Write N samples of a dataset as a TIFF dataset folder (loadable with --dataset tiff)."""
    from segcft.config import component_params

    config = component_params("dataset", name, overrides)
    export_dataset = _library("segcft.data.tools", "export_dataset", "data export")
    export_dataset(name, config, out, n)
    click.echo(f"wrote {out}")


@data_group.command("show")
@click.argument("dataset")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG montage to write [default: <dataset name>-montage.png in the current folder].",
)
def data_show(dataset: str, out: Path | None) -> None:
    """Print counts, variable ranges and class frequencies of DATASET (a plugin name or a dataset
    folder) and write a PNG montage of samples with mask overlays."""
    show_dataset = _library("segcft.data.tools", "show_dataset", "data show")
    if out is None:
        out = Path.cwd() / f"{Path(dataset).name}-montage.png"
    click.echo(show_dataset(dataset, out))
