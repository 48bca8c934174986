"""The ``segcft data`` commands: check, measure, export and show datasets (added to the root
group in segcft/cli.py). A dataset is a folder given positionally (its format recognised by its
images) or ``--dataset NAME`` with ``--set KEY=VALUE`` settings, for any registered dataset."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from segcft.cli_base import _complete_names, _library


def _dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--dataset NAME`` and repeatable ``--set KEY=VALUE``, shared by every data command."""
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="A setting of the dataset's config, checked as `segcft train --set dataset.KEY=VALUE` "
        "(e.g. --set size=128; repeatable).",
    )(fn)
    return click.option(
        "--dataset",
        "name",
        default=None,
        shell_complete=_complete_names("dataset"),
        help="Registered dataset name (a phantom, a plugin); with a FOLDER, the folder is its path.",
    )(fn)


def _resolve(source: Any, name: str | None, overrides: tuple[str, ...]) -> tuple[str, Any]:
    """(dataset name, config): user errors (unknown name, bad --set, unrecognised folder) exit 2 here."""
    resolve = _library("segcft.data.tools", "resolve_dataset", "data")
    return resolve(source, name, overrides)


@click.group("data")
def data_group() -> None:
    """Check, measure, export and show datasets."""


@data_group.command("check")
@click.argument("folder", required=False, type=click.Path(exists=True, path_type=Path))
@_dataset_options
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Items per split loaded and checked against the sample contract (0: all).",
)
def data_check(folder: Path | None, name: str | None, overrides: tuple[str, ...], samples: int) -> None:
    """Check a dataset (FOLDER or --dataset NAME): its own checks (a folder's files, a plugin's
    check), then every split loads and its items meet the sample contract. Lists every problem
    and exits 2 when there are any."""
    dataset, config = _resolve(folder, name, overrides)
    check_dataset = _library("segcft.data.tools", "check_dataset", "data check")
    problems = check_dataset(dataset, config, samples=samples)
    label = folder if folder is not None else dataset
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {label}", err=True)
        sys.exit(2)
    click.echo(f"{label}: ok")


@data_group.command("measure")
@click.argument("folder", required=False, type=click.Path(exists=True, path_type=Path))
@_dataset_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CSV of the measured structure variables.",
)
def data_measure(folder: Path | None, name: str | None, overrides: tuple[str, ...], out: Path) -> None:
    """Measure the structure variables (areas/volumes) of a dataset (FOLDER or --dataset NAME) from its masks."""
    dataset, config = _resolve(folder, name, overrides)
    measure_dataset = _library("segcft.data.tools", "measure_dataset", "data measure")
    measure_dataset(dataset, out, config)
    click.echo(f"wrote {out}")


@data_group.command("export")
@_dataset_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Number of samples (exactly; else exit 2).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tiff", "nifti"]),
    default="tiff",
    show_default=True,
    help="Folder format: tiff (loads with --dataset tiff) or nifti (loads with --dataset nifti; HU for CT).",
)
def data_export(name: str | None, overrides: tuple[str, ...], out: Path, n: int, fmt: str) -> None:
    """Write N samples of a dataset as a dataset folder (80/10/10 over train/val/test)."""
    if name is None:
        raise click.UsageError("Missing option '--dataset'.")
    dataset, config = _resolve(None, name, overrides)
    export_dataset = _library("segcft.data.tools", "export_dataset", "data export")
    export_dataset(dataset, config, out, n, fmt)
    counts = _library("segcft.data.tools", "exported_counts", "data export")(out)
    click.echo(f"wrote {out}: {n} samples ({', '.join(f'{s} {k}' for s, k in counts.items())})")


@data_group.command("show")
@click.argument("source", required=False)
@_dataset_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG montage to write [default: <dataset name>-montage.png in the current folder].",
)
def data_show(source: str | None, name: str | None, overrides: tuple[str, ...], out: Path | None) -> None:
    """Print counts, variable ranges and class frequencies of a dataset (SOURCE: a dataset name
    or folder, or --dataset NAME) and write a PNG montage of samples with mask overlays."""
    dataset, config = _resolve(source, name, overrides)
    show_dataset = _library("segcft.data.tools", "show_dataset", "data show")
    if out is None:
        out = Path.cwd() / f"{Path(source).name if source else dataset}-montage.png"
    click.echo(show_dataset(dataset, out, config=config, label=source or dataset))
