"""Phantoms (determinism, exact areas, locality, DAG, normalisation), the TIFF loader
(round trip of both phantoms, every bad-input case) and the dataset tools."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from segcft.data import ccta_phantom, cxr_phantom, tiff, tools
from segcft.data.configs import CCTAPhantomConfig, CXRPhantomConfig, TiffConfig
from segcft.errors import DatasetError, UserError

torch.set_num_threads(1)

CXR = CXRPhantomConfig(train_size=256, val_size=16, test_size=16)
CCTA = CCTAPhantomConfig(depth=48, side=24, train_size=128, val_size=8, test_size=8)


def _batch(ds, idx):
    exo, pa = ds.subjects(idx)
    return exo, pa


# -- phantoms ------------------------------------------------------------------------------


@pytest.mark.parametrize("module,config", [(cxr_phantom, CXR), (ccta_phantom, CCTA)])
def test_deterministic_and_order_independent(module, config):
    a = module.build(config, "train")
    b = module.build(config, "train")
    one = a[5]
    batch = b.__getitems__([7, 5, 3])
    assert torch.equal(one["image"], batch[1]["image"])
    assert torch.equal(one["mask"], batch[1]["mask"])
    assert torch.equal(one["exogenous"], batch[1]["exogenous"])
    other_split = module.build(config, "val")[5]
    assert not torch.equal(one["parents"], other_split["parents"])
    other_seed = module.build(type(config)(**{**config.__dict__, "seed": 1}), "train")[5]
    assert not torch.equal(one["image"], other_seed["image"])


@pytest.mark.parametrize("module,config", [(cxr_phantom, CXR), (ccta_phantom, CCTA)])
def test_item_format_and_collate(module, config):
    ds = module.build(config, "test")
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    info = ds.info
    s = info.shape
    assert batch["image"].shape == (4, 1, *s) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["mask"].shape == (4, *s) and batch["mask"].dtype == torch.int64
    assert batch["parents"].shape == (4, len(info.variables)) and batch["parents"].dtype == torch.float32
    assert batch["exogenous"].dtype == torch.float32 and batch["index"].tolist() == [0, 1, 2, 3]
    assert ("regions" in batch) == bool(info.regions)
    for v in info.variables:
        if v.is_structure:
            assert v.measure.structure in info.structures.values()
    # render from the batch's own (denormalised) parents reproduces the items
    img, mask, _ = ds.render(batch["exogenous"], info.denormalise(batch["parents"].double()).float())
    assert (mask != batch["mask"]).float().mean() < 0.002
    assert (img - batch["image"]).abs().max() < 0.05


@pytest.mark.parametrize(
    "module,config", [(cxr_phantom, CXR), (ccta_phantom, CCTAPhantomConfig(train_size=128, val_size=8, test_size=8))]
)
def test_rendered_areas_match_variables(module, config):
    """The contract at the default sizes: measured areas/volumes within 2% of the variables."""
    ds = module.build(config, "train")
    exo, pa = ds.subjects(np.arange(64))
    _, mask, regions = ds.render(exo, pa)
    info = ds.info
    for j, v in enumerate(info.variables):
        if not v.is_structure:
            continue
        sel = mask == info.class_index(v.measure.structure)
        if v.measure.region:
            sel &= regions == info.region_id(v.measure.region)
        area = sel.flatten(1).sum(1).double() * info.voxel_size
        rel = (area - pa[:, j].double()).abs() / pa[:, j].double()
        assert rel.max() < 0.02, (v.name, rel.max())


def _outside_change(ds, j, factor):
    """Largest pixel change outside the old/new extent of the structure of variable j."""
    info = ds.info
    exo, pa = ds.subjects(np.arange(16))
    pa_cf = pa.clone()
    pa_cf[:, j] *= factor
    var = info.variables[j]
    if info.name == "ccta-phantom":  # lumen follows its mechanism: same healthy volume
        pa_cf[:, 6] -= pa_cf[:, j] - pa[:, j]
    img, mask, _ = ds.render(exo, pa)
    img2, mask2, _ = ds.render(exo, pa_cf)
    label = info.class_index(var.measure.structure)
    extent = (mask == label) | (mask2 == label)
    changed = (img[:, 0] != img2[:, 0]) | (mask != mask2)
    return changed & ~extent, changed, (mask2 == label).flatten(1).sum(1)


@pytest.mark.parametrize("name", ["right_lung_area", "left_lung_area", "heart_area"])
def test_cxr_counterfactual_is_local(name):
    ds = cxr_phantom.build(CXR, "train")
    outside, changed, new_count = _outside_change(ds, ds.info.index(name), 1.15)
    assert changed.any()
    assert not outside.any()


@pytest.mark.parametrize("name", ["plaque_proximal", "plaque_mid", "plaque_distal"])
def test_ccta_plaque_edit_stays_in_its_third(name):
    ds = ccta_phantom.build(CCTA, "train")
    info = ds.info
    j = info.index(name)
    exo, pa = ds.subjects(np.arange(8))
    pa_cf = pa.clone()
    pa_cf[:, j] *= 1.5
    pa_cf[:, 6] -= pa_cf[:, j] - pa[:, j]
    img, mask, regions = ds.render(exo, pa)
    img2, mask2, _ = ds.render(exo, pa_cf)
    changed = (img[:, 0] != img2[:, 0]) | (mask != mask2)
    rid = info.region_id(info.variable(name).measure.region)
    assert changed.any()
    assert not (changed & (regions != rid)).any()
    inner = (mask > 0) | (mask2 > 0)
    assert not (changed & ~inner).any()


def test_dag_and_normalisation_from_train_only():
    info = cxr_phantom.build(CXR, "val").info
    assert info.variable_names == ["sex", "age", "body_size", "right_lung_area", "left_lung_area", "heart_area"]
    assert info.descendants("age") == {"right_lung_area", "left_lung_area", "heart_area"}
    assert info.descendants("body_size") == {"right_lung_area", "left_lung_area", "heart_area"}
    _, pa = cxr_phantom.build(CXR, "train").subjects(np.arange(CXR.train_size))
    np.testing.assert_allclose(info.normalisation.mean[1], pa[:, 1].double().mean().item(), rtol=1e-5)
    assert info.normalisation.mean[0] == 0.0 and info.normalisation.std[0] == 1.0
    assert cxr_phantom.build(CXR, "test").info.normalisation == info.normalisation
    r = np.corrcoef(pa[:, 3].numpy(), pa[:, 4].numpy())[0, 1]
    assert r > 0.8  # shared body size
    assert np.corrcoef(pa[:, 2].numpy(), pa[:, 3].numpy())[0, 1] > 0.7  # ... which is a parent
    plausible = pa[:, 3:].double()
    assert 9e3 < plausible[:, 0].mean() < 2.2e4 and 7e3 < plausible[:, 2].mean() < 1.4e4

    cinfo = ccta_phantom.build(CCTA, "train").info
    assert cinfo.descendants("plaque_mid") == {"lumen_volume"}
    assert cinfo.descendants("age") >= {"contrast", "plaque_mid", "lumen_volume"}
    assert cinfo.regions == {1: "proximal", 2: "mid", 3: "distal"}
    _, cpa = ccta_phantom.build(CCTA, "train").subjects(np.arange(CCTA.train_size))
    # the shortcut: contrast anti-correlates with plaque burden through age
    assert np.corrcoef(cpa[:, 2].numpy(), cpa[:, 3:6].sum(1).numpy())[0, 1] < -0.2


def test_bad_phantom_config():
    with pytest.raises(UserError, match="size"):
        cxr_phantom.build(CXRPhantomConfig(size=512), "train")
    with pytest.raises(ValueError, match="split"):
        cxr_phantom.build(CXR, "validation")


# -- TIFF round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", [("cxr-phantom", CXR), ("ccta-phantom", CCTA)])
def test_export_roundtrip(tmp_path, name, config):
    out = tools.export_dataset(name, config, tmp_path / "ds", 10)
    assert tools.check_dataset(out) == []
    phantom = (cxr_phantom if name == "cxr-phantom" else ccta_phantom).build(config, "train")
    loaded = tiff.build(TiffConfig(path=str(out)), "train")
    assert len(loaded) == 8
    assert loaded.info.spacing == pytest.approx(phantom.info.spacing)
    assert loaded.info.variable_names == phantom.info.variable_names
    assert loaded.info.regions == phantom.info.regions
    for i in (0, 7):
        a, b = phantom[i], loaded[i]
        torch.testing.assert_close(b["image"], a["image"], atol=1e-6, rtol=0)
        assert torch.equal(a["mask"], b["mask"])
        if phantom.info.regions:
            assert torch.equal(a["regions"], b["regions"])
        pa = phantom.info.denormalise(a["parents"].double())
        pb = loaded.info.denormalise(b["parents"].double())
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-6)
    assert len(tiff.build(TiffConfig(path=str(out)), "val")) == 1


def test_loader_resize_crop_measure_and_workers(tmp_path):
    out = tools.export_dataset("cxr-phantom", CXR, tmp_path / "ds", 5)
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    with (out / "attributes.csv").open() as f:
        rows = list(csv.DictReader(f))
    # drop the structure columns: they are then measured from the masks
    with (out / "attributes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "sex", "age", "body_size"])
        for r in rows:
            w.writerow([r["id"], r["split"], r["sex"], r["age"], r["body_size"]])
    before = sorted(p.name for p in out.rglob("*"))
    ds = tiff.build(TiffConfig(path=str(out), size=(32, 32)), "train")
    pa = ds.physical_parents()
    for r, row in zip(rows, pa):
        assert abs(row[3] - float(r["right_lung_area"])) / float(r["right_lung_area"]) < 0.001
    assert ds.info.spacing == pytest.approx((2 * spec["spacing"][0],) * 2)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (32, 32)
    assert set(item["mask"].unique().tolist()) <= {0, 1, 2, 3}
    crop = tiff.build(TiffConfig(path=str(out), size=(40, 40), fit="crop"), "train")[0]
    full = tiff.build(TiffConfig(path=str(out)), "train")[0]
    assert torch.equal(crop["mask"], full["mask"][12:52, 12:52])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert next(iter(loader))["image"].shape == (2, 1, 32, 32)
    measured = tools.measure_dataset(out, tmp_path / "measured.csv")
    with measured.open() as f:
        m = list(csv.DictReader(f))
    assert float(m[0]["heart_area"]) == pytest.approx(float(rows[0]["heart_area"]), rel=1e-3)
    with pytest.raises(UserError, match="inside the dataset folder"):
        tools.measure_dataset(out, out / "x.csv")
    text = tools.show_dataset(str(out), tmp_path / "show.png")
    assert "heart" in text and (tmp_path / "show.png").stat().st_size > 1000
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written into the dataset


def test_show_phantom(tmp_path):
    text = tools.show_dataset("ccta-phantom", tmp_path / "c.png", samples=2)
    assert "plaque_mid" in text and "lumen" in text


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return tools.export_dataset("cxr-phantom", CXR, tmp_path_factory.mktemp("good") / "ds", 6)


def _copy(good: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(good, tmp_path / "ds"))


def _edit_yaml(root: Path, **changes) -> None:
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    spec.update(changes)
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))


def _edit_csv(root: Path, fn) -> None:
    with (root / "attributes.csv").open() as f:
        rows = list(csv.reader(f))
    rows = fn(rows)
    with (root / "attributes.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def _messages(root: Path) -> list[str]:
    return [str(p) for p in tools.check_dataset(root)]


def test_good_dataset_has_no_problems(good):
    assert tools.check_dataset(good) == []


def test_missing_and_corrupt_files(good, tmp_path):
    root = _copy(good, tmp_path)
    (root / "images" / "train_00000.tif").unlink()
    (root / "masks" / "train_00001.tif").write_bytes(b"II*\x00garbage")
    (root / "images" / "train_00002.tif").write_bytes(b"not a tiff at all")
    tifffile.imwrite(root / "images" / "orphan.tif", np.zeros((64, 64), np.float32))
    msgs = _messages(root)
    assert any("images/train_00000.tif" in m and "no image file" in m for m in msgs)
    assert any("masks/train_00001.tif" in m and "corrupt" in m for m in msgs)
    assert any("images/train_00002.tif" in m and "corrupt" in m for m in msgs)
    assert any("images/orphan.tif" in m and "no row" in m for m in msgs)
    with pytest.raises(DatasetError, match="train_0000"):
        tiff.build(TiffConfig(path=str(root)), "train")


def test_shape_and_label_problems(good, tmp_path):
    root = _copy(good, tmp_path)
    tifffile.imwrite(root / "masks" / "train_00000.tif", np.zeros((32, 64), np.uint8))
    bad = tifffile.imread(root / "masks" / "train_00001.tif")
    bad[0, 0] = 7
    tifffile.imwrite(root / "masks" / "train_00001.tif", bad)
    tifffile.imwrite(root / "masks" / "train_00002.tif", np.zeros((64, 64), np.float32))
    tifffile.imwrite(root / "images" / "train_00003.tif", np.zeros((2, 64, 64), np.float32))
    msgs = _messages(root)
    assert any("masks/train_00000.tif" in m and "differs from the image shape" in m for m in msgs)
    assert any("masks/train_00001.tif" in m and "[7]" in m for m in msgs)
    assert any("masks/train_00002.tif" in m and "integer" in m for m in msgs)
    assert any("images/train_00003.tif" in m and "2D" in m for m in msgs)


def test_csv_problems(good, tmp_path):
    root = _copy(good, tmp_path)

    def corrupt(rows):
        h = rows[0]
        rows[1][h.index("age")] = "NaN"
        rows[2][h.index("heart_area")] = "big"
        rows[3][h.index("sex")] = "2"
        rows[4][h.index("split")] = "training"
        rows.append(["ghost"] + rows[5][1:])
        return rows

    _edit_csv(root, corrupt)
    problems = tools.check_dataset(root)
    found = {(p.row, p.key) for p in problems}
    assert {(2, "age"), (3, "heart_area"), (4, "sex"), (5, "split")} <= found
    assert any(p.file == "images/ghost.tif" for p in problems)

    _edit_csv(root, lambda rows: [["name"] + r[1:] for r in rows])
    assert any(p.key == "id" and "no 'id' column" in p.message for p in tools.check_dataset(root))


def test_yaml_problems(good, tmp_path):
    root = _copy(good, tmp_path)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    variables = spec["variables"]
    variables["sex"]["parents"] = ["heart_area"]
    variables["age"]["parents"] = ["height"]
    _edit_yaml(root, spacing=[1.0, 0.0, 2.0], variables=variables)
    msgs = _messages(root)
    assert any("[spacing]" in m for m in msgs)
    assert any("[variables.age.parents]" in m and "height" in m for m in msgs)
    variables["age"]["parents"] = []
    _edit_yaml(root, spacing=[5.5, -1], variables=variables)
    msgs = _messages(root)
    assert any("[spacing]" in m and "> 0" in m for m in msgs)
    assert any("cycle" in m for m in msgs)
    with pytest.raises(DatasetError, match="spacing"):
        tiff.build(TiffConfig(path=str(root)), "train")
    (root / "dataset.yaml").write_text("name: [unclosed")
    assert "unreadable YAML" in _messages(root)[0]
    assert "missing" in str(tools.check_dataset(tmp_path / "nowhere")[0]) or tools.check_dataset(tmp_path / "nowhere")
