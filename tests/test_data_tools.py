"""`segcft data check|measure|show|export` for any dataset: the phantoms exported as NIfTI folders
and read back by the nifti dataset, exact export counts, folder recognition, --dataset/--set, and
a plugin dataset's own check plus the generic sample-contract checks."""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import segcft
from segcft import plugins
from segcft.cli import cli
from segcft.data import ccta_phantom, cxr_phantom, nifti, tools
from segcft.data.configs import CCTAPhantomConfig, CXRPhantomConfig, NiftiConfig
from segcft.data.export import HU_WINDOWS, split_counts
from segcft.errors import UserError

nib = pytest.importorskip("nibabel")
torch.set_num_threads(1)

PHANTOMS = {
    "cxr-phantom": (cxr_phantom, CXRPhantomConfig(train_size=64, val_size=8, test_size=8), ["size=64"]),
    "ccta-phantom": (
        ccta_phantom,
        CCTAPhantomConfig(depth=48, side=24, train_size=64, val_size=8, test_size=8),
        ["depth=48", "side=24"],
    ),
}
SIZES = ["train_size=64", "val_size=8", "test_size=8"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="segcft")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_phantom_as_nifti_checks_measures_and_loads_back(tmp_path, name):
    module, config, sets = PHANTOMS[name]
    out = tmp_path / "nii"
    args = [a for s in sets + SIZES for a in ("--set", s)]
    res = run("data", "export", "--dataset", name, "--out", str(out), "--n", "11", "--format", "nifti", *args)
    assert res.exit_code == 0, res.output
    assert len(list((out / "images").glob("*.nii.gz"))) == 11
    res = run("data", "check", str(out))
    assert res.exit_code == 0 and res.output.strip().endswith(": ok"), res.output
    res = run("data", "measure", str(out), "--out", str(tmp_path / "m.csv"))
    assert res.exit_code == 0, res.output
    measured, attributes = _csv(tmp_path / "m.csv"), _csv(out / "attributes.csv")
    assert [r["id"] for r in measured] == [r["id"] for r in attributes]

    phantom = module.build(config, "train")
    info = phantom.info
    loaded = nifti.build(NiftiConfig(path=str(out)), "train")
    assert len(loaded) == 9  # 11 = 9 train + 1 val + 1 test
    assert loaded.info.spatial_dims == info.spatial_dims and loaded.info.shape == info.shape
    assert loaded.info.spacing == pytest.approx(info.spacing)
    phys = loaded.physical_parents()
    for i in range(len(loaded)):
        a, b = phantom[i], loaded[i]
        torch.testing.assert_close(b["image"], a["image"], atol=1e-5, rtol=0)
        assert torch.equal(a["mask"], b["mask"])
        if info.regions:
            assert torch.equal(a["regions"], b["regions"])
        for j, v in enumerate(info.variables):
            if v.measure is None:
                continue
            sel = a["mask"] == info.class_index(v.measure.structure)
            if v.measure.region:
                sel &= a["regions"] == info.region_id(v.measure.region)
            own = float(sel.sum()) * info.voxel_size  # the phantom's own rendered size
            m = float(measured[i][v.name])
            assert m == pytest.approx(own, rel=1e-5), v.name  # spacing travels in the affine
            assert m == pytest.approx(phys[i, j], rel=0.03), v.name  # close to the phantom's attribute
            assert phys[i, j] == pytest.approx(float(attributes[i][v.name]), rel=1e-6)


def test_ccta_nifti_holds_hu(tmp_path):
    """The CT export writes CT numbers: the contrast-filled lumen reads close to the subject's
    contrast variable (HU), and dataset.yaml declares the window that maps HU back to [-1, 1]."""
    import yaml

    out = tools.export_dataset("ccta-phantom", PHANTOMS["ccta-phantom"][1], tmp_path / "ct", 4, "nifti")
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    lo, hi = HU_WINDOWS["ccta-phantom"]
    assert spec["intensity"] == {"min": lo, "max": hi}
    for r in _csv(out / "attributes.csv"):
        hu = np.asanyarray(nib.load(str(out / "images" / f"{r['id']}.nii.gz")).dataobj)
        mask = np.asanyarray(nib.load(str(out / "masks" / f"{r['id']}.nii.gz")).dataobj)
        lumen = float(hu[mask == 1].mean())
        assert 0.8 * float(r["contrast"]) < lumen < 1.1 * float(r["contrast"])


@pytest.mark.parametrize(
    "n,lengths",
    [(24, (4096, 512, 512)), (24, (20, 2, 2)), (24, (16, 100, 100)), (24, (100, 0, 1)), (2, (5, 5, 5)), (7, (1, 3, 3))],
)
def test_export_counts_are_exact(n, lengths):
    counts = split_counts("x", n, dict(zip(("train", "val", "test"), lengths)))
    assert sum(counts.values()) == n and counts["train"] >= 1
    assert all(counts[s] <= k for s, k in zip(("train", "val", "test"), lengths))


def test_export_writes_exactly_n_or_exits_2(tmp_path):
    sets = ["--set", "size=16", "--set", "train_size=20", "--set", "val_size=2", "--set", "test_size=2"]
    res = run("data", "export", "--dataset", "cxr-phantom", "--out", str(tmp_path / "a"), "--n", "24", *sets)
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(": 24 samples (train 20, val 2, test 2)")
    assert len(_csv(tmp_path / "a" / "attributes.csv")) == 24
    assert len(list((tmp_path / "a" / "images").glob("*.tif"))) == 24
    res = run("data", "export", "--dataset", "cxr-phantom", "--out", str(tmp_path / "b"), "--n", "25", *sets)
    assert res.exit_code == 2 and "--n 25: dataset 'cxr-phantom' has only 24 samples" in res.output
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="--format must be one of"):
        tools.export_dataset("cxr-phantom", None, tmp_path / "c", 3, "png")


def test_export_nifti_without_nibabel_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    out = str(tmp_path / "a")
    res = run("data", "export", "--dataset", "cxr-phantom", "--out", out, "--n", "3", "--format", "nifti")
    assert res.exit_code == 2 and 'pip install "segcft[nifti]"' in res.output
    assert not (tmp_path / "a").exists()


def test_folder_recognition_and_dataset_settings(tmp_path):
    (tmp_path / "odd" / "images").mkdir(parents=True)
    (tmp_path / "odd" / "images" / "a.png").write_bytes(b"")
    res = run("data", "check", str(tmp_path / "odd"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "found dataset.yaml missing, images/ with 0 .tif, 0 .nii/.nii.gz and 1 other files" in res.output
    assert "expected dataset.yaml and images/*.tif (tiff) or images/*.nii[.gz] (nifti)" in res.output
    res = run("data", "check", "--dataset", "tiff")
    assert res.exit_code == 2 and res.output.startswith("TIFF dataset: no path set (give the folder containing")
    res = run("data", "check", "--dataset", "cxr-phantom", "--set", "sizee=3")
    assert res.exit_code == 2 and "unknown key 'sizee'; did you mean 'size'?" in res.output
    res = run("data", "measure", "--dataset", "cxr-phantom", "--set", "size=abc", "--out", str(tmp_path / "m.csv"))
    assert res.exit_code == 2 and "expected int" in res.output and "size" in res.output
    sets = ["--set", "size=16", "--set", "train_size=6", "--set", "val_size=2", "--set", "test_size=2"]
    res = run("data", "show", "cxr-phantom", *sets, "--out", str(tmp_path / "s.png"))
    assert res.exit_code == 0, res.output
    assert "shape [16, 16]" in res.output and "samples: train 6, val 2, test 2" in res.output
    res = run("data", "check", "--dataset", "cxr-phantom", *sets, "--samples", "0")
    assert res.exit_code == 0 and "cxr-phantom: ok" in res.output, res.output
    res = run("data", "measure", "--dataset", "cxr-phantom", *sets, "--out", str(tmp_path / "m.csv"))
    assert res.exit_code == 0, res.output
    rows = _csv(tmp_path / "m.csv")
    assert len(rows) == 10 and rows[0]["id"] == "train_00000" and float(rows[0]["heart_area"]) > 0


# -- a plugin dataset: its own check and the generic checks ---------------------------------


@dataclass
class ToyConfig:
    broken: str = field(default="", metadata={"help": "what to break: '', 'labels', 'nan', 'own', 'crash'"})


class ToyDataset:
    def __init__(self, config: ToyConfig, split: str) -> None:
        self.info = cxr_phantom.build(CXRPhantomConfig(size=16, train_size=4, val_size=2, test_size=2), split).info
        self.config = config

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict:
        mask = torch.zeros(16, 16, dtype=torch.int64)
        image = torch.zeros(1, 16, 16)
        if i == 2 and self.config.broken == "labels":
            mask[0, 0] = 7
        if i == 1 and self.config.broken == "nan":
            image[0, 3, 3] = float("nan")
        return {"image": image, "mask": mask, "parents": torch.zeros(6), "index": torch.tensor(i)}


def build(config: ToyConfig, split: str) -> ToyDataset:
    return ToyDataset(config, split)


def check(config: ToyConfig) -> list[str]:
    """The toy plugin's own check (found next to its factory, like dataset_info)."""
    if config.broken == "crash":
        raise RuntimeError("no scanner table")
    return ["toy: the scanner file is missing"] if config.broken == "own" else []


class ToyPlugin:
    @segcft.hookimpl
    def segcft_register_datasets(self, register):
        register("toy-data", build, config=ToyConfig, dims=(2,))


@pytest.fixture
def toy():
    plugins.reset()
    plugins.register_plugin(ToyPlugin(), "toy")
    yield
    plugins.reset()


def test_plugin_dataset_own_and_generic_checks(toy):
    assert run("data", "check", "--dataset", "toy-data").exit_code == 0
    res = run("data", "check", "--dataset", "toy-data", "--set", "broken=labels")
    assert res.exit_code == 2
    assert "train[2]: mask: labels must lie in [0, 4), got [0, 7]" in res.output
    assert "val[2]: mask" in res.output and "test[2]: mask" in res.output
    res = run("data", "check", "--dataset", "toy-data", "--set", "broken=nan")
    assert res.exit_code == 2 and "train[1]: image: values must be finite and in [-1, 1]" in res.output
    res = run("data", "check", "--dataset", "toy-data", "--set", "broken=own")
    assert res.exit_code == 2 and res.output.splitlines()[0] == "toy: the scanner file is missing"
    res = run("data", "check", "--dataset", "toy-data", "--set", "broken=crash")
    assert res.exit_code == 2 and "the dataset's own check failed: RuntimeError: no scanner table" in res.output
    res = run("data", "check", "--dataset", "toy-data", "--set", "broken=labels", "--samples", "2")
    assert res.exit_code == 0, res.output  # the broken item is the third: not among the first 2
