"""The folder-dataset plugin example of docs/plugins.md, exactly as written there: registered as a
plugin, it passes `segcft data check` on a small .npy folder written here, loads, measures and
reports a broken file."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from segcft import plugins
from segcft.cli import cli
from segcft.protocols import Dataset

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SPEC = {
    "name": "npy-toy",
    "spatial_dims": 2,
    "spacing": [0.5, 0.25],
    "intensity": {"min": 0, "max": 1000},
    "structures": {1: "lesion"},
    "variables": {
        "age": {"type": "continuous", "unit": "years"},
        "lesion_area": {"type": "continuous", "parents": ["age"], "unit": "mm^2", "measure": {"structure": "lesion"}},
    },
}
SPLITS = ["train", "train", "train", "train", "val", "test"]


def _example() -> str:
    found = re.findall(r"<!-- example: npy-folder -->\s*```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(found) == 1, "docs/plugins.md: expected one ```python block after <!-- example: npy-folder -->"
    return found[0]


def _write_folder(root: Path) -> list[float]:
    """Six 12 x 16 samples, a lesion of k + 1 rows of 4 pixels in sample k; returns the areas (mm^2)."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    (root / "dataset.yaml").write_text(yaml.safe_dump(SPEC))
    areas = []
    with (root / "attributes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "age"])
        for k, split in enumerate(SPLITS):
            mask = np.zeros((12, 16), np.uint8)
            mask[2 : 3 + k, 4:8] = 1
            image = np.where(mask > 0, 800.0, 100.0).astype(np.float32)
            np.save(root / "images" / f"s{k}.npy", image)
            np.save(root / "masks" / f"s{k}.npy", mask)
            w.writerow([f"s{k}", split, 40 + k])
            areas.append(float(mask.sum()) * 0.5 * 0.25)
    return areas


@pytest.fixture
def npy_plugin(tmp_path, monkeypatch):
    """The documented module as my_package.npy_folder, registered as a plugin."""
    pkg = tmp_path / "pkg" / "my_package"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "npy_folder.py").write_text(_example())
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    for name in ("my_package", "my_package.npy_folder"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    module = importlib.import_module("my_package.npy_folder")
    plugins.reset()
    plugins.register_plugin(module, "npy")
    yield module
    plugins.reset()


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="segcft")


def test_example_is_short():
    assert len(_example().splitlines()) < 60


def test_documented_folder_plugin_checks_loads_and_measures(npy_plugin, tmp_path):
    root = tmp_path / "data"
    areas = _write_folder(root)
    res = run("data", "check", str(root), "--dataset", "npy-folder")
    assert res.exit_code == 0 and res.output.strip().endswith(": ok"), res.output
    res = run("data", "check", "--dataset", "npy-folder", "--set", f"path={root}", "--samples", "0")
    assert res.exit_code == 0, res.output

    entry = plugins.get_registry().get("dataset", "npy-folder")
    config = entry.config()
    config.path = str(root)
    train = entry.load()(config, "train")
    assert isinstance(train, Dataset) and len(train) == 4
    item = train[1]
    assert item["image"].shape == (1, 12, 16) and item["image"].dtype == torch.float32
    assert float(item["image"].max()) == pytest.approx(0.6) and float(item["image"].min()) == pytest.approx(-0.8)
    assert torch.equal(item["mask"], torch.from_numpy(np.load(root / "masks" / "s1.npy").astype(np.int64)))
    assert train.info.spacing == (0.5, 0.25) and train.info.class_names == ("background", "lesion")
    assert train.physical_parents()[:, 1].tolist() == pytest.approx(areas[:4])  # measured from the masks
    config.size = (6, 8)
    assert entry.load()(config, "val")[0]["mask"].shape == (6, 8)

    res = run("data", "measure", str(root), "--dataset", "npy-folder", "--out", str(tmp_path / "m.csv"))
    assert res.exit_code == 0, res.output
    with (tmp_path / "m.csv").open() as f:
        assert [float(r["lesion_area"]) for r in csv.DictReader(f)] == pytest.approx(areas)
    res = run("data", "show", str(root), "--dataset", "npy-folder", "--out", str(tmp_path / "s.png"))
    assert res.exit_code == 0 and "samples: train 4, val 1, test 1" in res.output, res.output


def test_documented_folder_plugin_reports_broken_files(npy_plugin, tmp_path):
    root = tmp_path / "data"
    _write_folder(root)
    mask = np.load(root / "masks" / "s2.npy")
    mask[0, 0] = 5
    np.save(root / "masks" / "s2.npy", mask)
    (root / "images" / "s4.npy").write_bytes(b"not a numpy file")
    res = run("data", "check", str(root), "--dataset", "npy-folder")
    assert res.exit_code == 2
    assert "masks/s2.npy [structures]: labels [5] are not declared in structures of dataset.yaml" in res.output
    assert "images/s4.npy: unreadable or corrupt NumPy (ValueError" in res.output
