"""The preset's 3D overlay follows the resolved dataset's dimensionality: a tiff folder's
dataset.yaml ``spatial_dims``, or a plugin's module-level ``dataset_dims(config)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from segcft import plugins
from segcft.config import is_3d_dataset, load_run_config, preset_path


def _overlay_steps() -> int:
    return yaml.safe_load(preset_path("quick").read_text())["when_3d"]["cft"]["steps"]


def _tiff_folder(root: Path, dims: int) -> Path:
    root.mkdir()
    spec = {
        "name": f"toy{dims}d",
        "spatial_dims": dims,
        "spacing": [2.0, 0.5, 0.5][-dims:],
        "structures": {1: "vessel"},
    }
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root


@dataclass
class EitherConfig:
    volume: bool = field(default=False, metadata={"help": "3D volumes instead of 2D images"})


def dataset_dims(config: EitherConfig) -> int:
    """Module-level convention read by config resolution (next to the factory below)."""
    return 3 if config.volume else 2


def _build(config: EitherConfig, split: str) -> None:
    return None


class EitherDataset:
    @plugins.hookimpl
    def segcft_register_datasets(self, register):
        register("either", _build, config=EitherConfig, dims=(2, 3))


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    plugins.reset()
    plugins.register_plugin(EitherDataset(), "either-plugin")
    yield
    plugins.reset()


def test_3d_tiff_folder_gets_the_overlay_2d_does_not(tmp_path):
    flat = load_run_config()
    volume = _tiff_folder(tmp_path / "vol", 3)
    image = _tiff_folder(tmp_path / "img", 2)
    cfg3 = load_run_config(components={"dataset": "tiff"}, overrides=[f"dataset.path={volume}"])
    cfg2 = load_run_config(components={"dataset": "tiff"}, overrides=[f"dataset.path={image}"])
    assert cfg3.cft.steps == _overlay_steps() != flat.cft.steps
    assert cfg3.train.generator == load_run_config(components={"dataset": "ccta-phantom"}).train.generator
    assert cfg2.cft.steps == flat.cft.steps and cfg2.train.generator == flat.train.generator
    # No folder yet (or no readable dataset.yaml): dimensionality unknown, no overlay.
    assert load_run_config(components={"dataset": "tiff"}).cft.steps == flat.cft.steps
    missing = load_run_config(components={"dataset": "tiff"}, overrides=[f"dataset.path={tmp_path / 'none'}"])
    assert missing.cft.steps == flat.cft.steps


def test_plugin_dataset_says_its_dims_from_its_config():
    flat = load_run_config()
    assert load_run_config(overrides=["dataset.name=either", "dataset.volume=true"]).cft.steps == _overlay_steps()
    assert load_run_config(overrides=["dataset.name=either"]).cft.steps == flat.cft.steps
    assert is_3d_dataset("either", EitherConfig(volume=True)) and not is_3d_dataset("either")


def test_registered_dims_decide_alone_when_single():
    assert is_3d_dataset("ccta-phantom") and not is_3d_dataset("cxr-phantom") and is_3d_dataset("nifti")
