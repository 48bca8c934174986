"""Bad dataset inputs: each is refused with one line naming the file and the offending value
when a sample is loaded (not only by `segcft data check`), and labels that are not 1..K map to
classes the same way in check, show, measure, loading and training."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from click.testing import CliRunner

from segcft.cli import cli
from segcft.data import tiff, tools
from segcft.data.configs import CXRPhantomConfig, TiffConfig
from segcft.errors import DatasetError, UserError

torch.set_num_threads(1)

CXR = CXRPhantomConfig(size=32, train_size=64, val_size=8, test_size=8)
MASK = "masks/train_00001.tif"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return tools.export_dataset("cxr-phantom", CXR, tmp_path_factory.mktemp("good") / "ds", 6)


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ds", symlinks=True))


def _train(root: Path) -> tiff.TiffDataset:
    return tiff.build(TiffConfig(path=str(root)), "train")


def _sample(ds: tiff.TiffDataset, sid: str) -> dict:
    return ds[ds.ids.index(sid)]


def _relabel(root: Path, old: int, new: int) -> None:
    """Masks and dataset.yaml with label ``old`` renamed ``new``."""
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    spec["structures"] = {(new if k == old else k): v for k, v in spec["structures"].items()}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for p in (root / "masks").glob("*.tif"):
        m = tifffile.imread(p)
        m[m == old] = new
        tifffile.imwrite(p, m)


def _set_pixel(root: Path, rel: str, value, dtype=None) -> None:
    arr = tifffile.imread(root / rel)
    arr = arr.astype(dtype or arr.dtype)
    arr[3, 4] = value
    tifffile.imwrite(root / rel, arr)


def test_labels_1_2_5_map_to_classes_everywhere(good, tmp_path):
    """Structures {1, 2, 5}: masks load as classes 0..3 (5 -> 3) with the original areas, the
    CSV measured by `data measure` matches, `data show` counts the heart and export writes the
    declared labels back."""
    root = _copy(good, tmp_path)
    ref = _train(good)
    _relabel(root, 3, 5)
    assert tools.check_dataset(root) == []
    ds = _train(root)
    assert ds.info.class_names == ("background", "right_lung", "left_lung", "heart")
    for sid in ds.ids[:3]:
        a, b = _sample(ref, sid), _sample(ds, sid)
        assert torch.equal(a["mask"], b["mask"]) and int(b["mask"].max()) == 3
    np.testing.assert_array_equal(tiff.labels_to_classes(np.array([[0, 5], [2, 1]]), ds.info.structures), [[0, 3], [2, 1]])

    def measured(folder: Path) -> dict[str, dict[str, str]]:
        with tools.measure_dataset(folder, tmp_path / f"{folder.parent.name}.csv").open() as f:
            return {r["id"]: r for r in csv.DictReader(f)}

    m, before = measured(root), measured(good)
    with (root / "attributes.csv").open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    for sid in ds.ids[:3]:
        assert m[sid] == before[sid]  # the same areas as with labels 1, 2, 3
        # within half a pixel per boundary pixel of the rendered area (121 mm^2 pixels at 32 x 32)
        assert float(m[sid]["heart_area"]) == pytest.approx(float(rows[sid]["heart_area"]), rel=0.02)

    text = tools.show_dataset(str(root), tmp_path / "show.png", samples=2)
    heart = [t for t in text.split(", ") if t.startswith("heart ")]
    assert heart and float(heart[0].split()[1].rstrip("%")) > 1.0

    again = tools.export_dataset("tiff", TiffConfig(path=str(root)), tmp_path / "again", 3)
    assert set(np.unique(tifffile.imread(next((again / "masks").glob("*.tif")))).tolist()) <= {0, 1, 2, 5}
    assert tools.check_dataset(again) == []


def test_labels_1_2_5_segmentation_loss(good, tmp_path):
    """The loaded masks fit a segmentor with 1 + K channels: the loss that failed with
    'index 5 is out of bounds' on labels {1, 2, 5} is finite."""
    from segcft.models.segmentation import segmentation_loss

    root = _copy(good, tmp_path)
    _relabel(root, 3, 5)
    ds = _train(root)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    logits = torch.zeros(4, len(ds.info.class_names), *ds.info.shape)
    assert torch.isfinite(segmentation_loss(logits, batch["mask"]))


def test_labels_1_2_5_train_segmentor(good, tmp_path):
    """The smoke segmentor stage on labels {1, 2, 5} trains (it stopped with 'index 5 is out of
    bounds for dimension 1 with size 4') and the run's dataset.json reads back."""
    from segcft.config import load_run_config
    from segcft.data.variables import read_dataset_info
    from segcft.train import run_training

    root = _copy(good, tmp_path)
    _relabel(root, 3, 5)
    cfg = load_run_config(None, "smoke", ["dataset.name=tiff", f"dataset.path={root}", "train.segmentor.steps=2"])
    run_training(cfg, tmp_path / "run", only=["segmentor"])
    assert (tmp_path / "run" / "checkpoints" / "segmentor.pt").is_file()
    assert read_dataset_info(tmp_path / "run" / "dataset.json").structures == {1: "right_lung", 2: "left_lung", 5: "heart"}


def test_nan_pixel_on_load(good, tmp_path):
    """A NaN image pixel: loading the sample names the file, the value and its voxel."""
    root = _copy(good, tmp_path)
    _set_pixel(root, "images/train_00001.tif", np.nan)
    ds = _train(root)
    with pytest.raises(DatasetError, match=r"images/train_00001\.tif: image contains NaN.*nan at voxel \(3, 4\)"):
        _sample(ds, "train_00001")
    _sample(ds, "train_00000")  # the other samples still load


def test_inf_pixel_beyond_float32_on_load(good, tmp_path):
    """A float64 pixel too large for float32 becomes inf when windowed: refused on load."""
    root = _copy(good, tmp_path)
    _set_pixel(root, "images/train_00002.tif", 1e300, np.float64)
    with pytest.raises(DatasetError, match=r"images/train_00002\.tif: .*1e\+300"):
        _sample(_train(root), "train_00002")
    assert any("images/train_00002.tif" in str(p) for p in tools.check_dataset(root))


def test_undeclared_label_on_load(good, tmp_path):
    """Mask label 7 (not in structures): loading names the file, the label and the declared ones."""
    root = _copy(good, tmp_path)
    _set_pixel(root, MASK, 7)
    with pytest.raises(DatasetError, match=r"masks/train_00001\.tif: labels \[7\] are not declared.*\[0, 1, 2, 3\]"):
        _sample(_train(root), "train_00001")


def test_negative_label_on_load(good, tmp_path):
    """A signed mask with label -1: refused on load and by check (key structures)."""
    root = _copy(good, tmp_path)
    _set_pixel(root, MASK, -1, np.int16)
    with pytest.raises(DatasetError, match=r"masks/train_00001\.tif: labels \[-1\]"):
        _sample(_train(root), "train_00001")
    assert [p.key for p in tools.check_dataset(root)] == ["structures"]


def test_symlink_outside_the_folder(good, tmp_path):
    """An image that is a symlink to a file outside the dataset: refused by check and on load."""
    root = _copy(good, tmp_path)
    outside = tmp_path / "elsewhere.tif"
    shutil.copy(root / "images" / "train_00001.tif", outside)
    (root / "images" / "train_00001.tif").unlink()
    os.symlink(outside, root / "images" / "train_00001.tif")
    problems = [str(p) for p in tools.check_dataset(root)]
    assert len(problems) == 1 and "images/train_00001.tif" in problems[0] and "outside the dataset folder" in problems[0]
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        _train(root)


def test_symlinked_folder_outside_on_load(good, tmp_path):
    """The masks folder replaced by a symlink to a copy outside, after the dataset was
    built: loading a sample refuses it."""
    root = _copy(good, tmp_path)
    ds = _train(root)
    shutil.move(root / "masks", tmp_path / "masks_outside")
    os.symlink(tmp_path / "masks_outside", root / "masks")
    with pytest.raises(DatasetError, match=r"masks/train_00000\.tif: resolves to .* outside the dataset folder"):
        _sample(ds, "train_00000")


def test_csv_id_with_parent_reference(good, tmp_path):
    """An id '../x' (or '..') in attributes.csv: a problem naming the CSV row and key id."""
    root = _copy(good, tmp_path)
    with (root / "attributes.csv").open() as f:
        rows = list(csv.reader(f))
    rows[1][0] = "../ds/images/train_00000"
    rows[2][0] = ".."
    with (root / "attributes.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    found = {(p.row, p.key) for p in tools.check_dataset(root) if "invalid id" in p.message}
    assert found == {(2, "id"), (3, "id")}
    with pytest.raises(DatasetError, match=r"attributes\.csv:2 \[id\]: invalid id"):
        _train(root)


def test_oversized_tiff_header(good, tmp_path):
    """A mask whose header declares 2**29 voxels (data never written): refused from the
    header by check and on load, without decoding it."""
    root = _copy(good, tmp_path)
    with tifffile.TiffWriter(root / MASK) as w:
        w.write(shape=(2**15, 2**14), dtype=np.uint8)
    msgs = [str(p) for p in tools.check_dataset(root)]
    assert any(MASK in m and "more than the limit" in m for m in msgs)
    with pytest.raises(DatasetError, match="more than the limit"):
        tiff.read_sample_file(root, _train(good)._spec, "masks", "train_00001")


def test_tiff_with_wrong_dims_on_load(good, tmp_path):
    """A 3D mask in a 2D dataset swapped in after the dataset was built: refused on load
    from the header."""
    root = _copy(good, tmp_path)
    ds = _train(root)
    tifffile.imwrite(root / MASK, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match=r"masks/train_00001\.tif: expected a 2D array"):
        _sample(ds, "train_00001")


def test_mask_shape_differs_on_load(good, tmp_path):
    """A mask of another shape than its image, swapped in after the dataset was built:
    refused on load rather than resized to fit."""
    root = _copy(good, tmp_path)
    ds = _train(root)
    tifffile.imwrite(root / MASK, np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"masks/train_00001\.tif: shape \(16, 16\) differs from the image shape \(32, 32\)"):
        _sample(ds, "train_00001")


def test_yaml_and_csv_not_utf8(good, tmp_path):
    """dataset.yaml and attributes.csv in Latin-1: one problem each naming the file."""
    root = _copy(good, tmp_path)
    (root / "dataset.yaml").write_bytes((root / "dataset.yaml").read_bytes().replace(b"name: cxr-phantom", b"name: r\xe9sum\xe9"))
    assert [str(p).split(":")[0] for p in tools.check_dataset(root)] == ["dataset.yaml"]
    assert "not UTF-8" in str(tools.check_dataset(root)[0])
    root2 = _copy(good, tmp_path / "b")
    (root2 / "attributes.csv").write_bytes((root2 / "attributes.csv").read_bytes() + b"caf\xe9,train,1,2,3,4,5,6\n")
    problems = tools.check_dataset(root2)
    assert len(problems) == 1 and problems[0].file == "attributes.csv" and "not UTF-8" in problems[0].message


def test_csv_missing_column(good, tmp_path):
    """A CSV without the age column: one problem naming the CSV and the key age."""
    root = _copy(good, tmp_path)
    with (root / "attributes.csv").open() as f:
        rows = list(csv.reader(f))
    j = rows[0].index("age")
    with (root / "attributes.csv").open("w", newline="") as f:
        csv.writer(f).writerows([r[:j] + r[j + 1:] for r in rows])
    problems = tools.check_dataset(root)
    assert [(p.file, p.key) for p in problems] == [("attributes.csv", "age")]


def test_csv_duplicate_column(good, tmp_path):
    """A second age column (which one is meant?): one problem naming the CSV header and key."""
    root = _copy(good, tmp_path)
    with (root / "attributes.csv").open() as f:
        rows = list(csv.reader(f))
    with (root / "attributes.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0] + ["age"]] + [r + ["3"] for r in rows[1:]])
    problems = tools.check_dataset(root)
    assert [(p.file, p.row, p.key) for p in problems] == [("attributes.csv", 1, "age")]
    assert "duplicate columns ['age']" in problems[0].message


def test_yaml_label_out_of_range(good, tmp_path):
    """Structure labels 2**40 and 1.5 in dataset.yaml: a problem each naming the key."""
    root = _copy(good, tmp_path)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    spec["structures"] = {1: "right_lung", 1.5: "left_lung", 2**40: "heart"}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    keys = {p.key for p in tools.check_dataset(root)}
    assert {"structures.1.5", f"structures.{2**40}"} <= keys


def test_yaml_region_id_beyond_the_kernels_bound(good, tmp_path):
    """Region id 2,000,000,000 in dataset.yaml would make the kernels allocate per class x
    region: `data check` names the key, and DatasetInfo refuses it for plugin datasets too."""
    from segcft.data.variables import MAX_REGION_ID, DatasetInfo, Normalisation
    from segcft.ops._validate import MAX_REGIONS

    assert MAX_REGION_ID == MAX_REGIONS - 1
    root = _copy(good, tmp_path)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    spec["regions"] = {1: "proximal", 2_000_000_000: "distal"}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    problems = tools.check_dataset(root)
    assert "regions.2000000000" in {p.key for p in problems}
    with pytest.raises(ValueError, match=r"region ids must be integers in \[0, 4095\]"):
        DatasetInfo("d", 2, (4, 4), (1.0, 1.0), {1: "a"}, [], Normalisation((), ()), regions={4096: "r"})


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder with only its config.yaml (as a run whose dataset.json was lost)."""
    from segcft.config import dump_run_config, load_run_config

    d = tmp_path / "run"
    dump_run_config(load_run_config(None, "smoke"), d / "config.yaml")
    return d


def _evaluate(run_dir: Path):
    return CliRunner().invoke(cli, ["evaluate", "--run", str(run_dir)], prog_name="segcft")


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "dataset.json: missing"),
        (b'{"name": "cxr-phantom", "spatial_dims": 2, "sha', "dataset.json: unreadable or truncated JSON"),
        (b"\xff\xfe{}", "dataset.json: unreadable or truncated JSON"),
        (b"[1, 2]", "dataset.json: expected a JSON object"),
        (b'{"name": "x"}', "dataset.json: missing key 'variables'"),
    ],
    ids=["missing", "truncated", "not-utf8", "not-object", "missing-key"],
)
def test_bad_dataset_json_in_run(run_dir, content, expected):
    """A run folder whose dataset.json is missing, truncated or incomplete: `segcft evaluate`
    exits 2 with one line naming the file, no traceback."""
    if content is not None:
        (run_dir / "dataset.json").write_bytes(content)
    result = _evaluate(run_dir)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(run_dir) in lines[0]
    assert "Traceback" not in result.output


def test_dataset_json_wrong_types(run_dir):
    """A dataset.json of the right keys but a non-numeric spacing: one line, exit 2."""
    info = _train_info()
    info["spacing"] = ["a", "b"]
    (run_dir / "dataset.json").write_text(json.dumps(info))
    result = _evaluate(run_dir)
    assert result.exit_code == 2 and "dataset.json: invalid dataset metadata" in result.output


def _train_info() -> dict:
    from segcft.data import cxr_phantom

    return cxr_phantom.build(CXR, "val").info.to_dict()


def test_export_n_larger_than_the_dataset(tmp_path):
    """`data export --n 24` of a phantom with 5 + 1 + 1 samples: exit 2 saying how many
    there are, and nothing written."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["data", "export", "--dataset", "cxr-phantom", "--out", str(out), "--n", "24",
         "--set", "size=16", "--set", "train_size=5", "--set", "val_size=1", "--set", "test_size=1"],
        prog_name="segcft",
    )
    assert result.exit_code == 2
    assert "--n 24" in result.output and "only 7 samples" in result.output
    assert not out.exists()


def test_export_n_with_short_splits_writes_n(tmp_path):
    """`data export --n 24` with val and test splits of one sample each: 24 files, the
    samples val and test cannot give taken from train (it used to write 22 silently)."""
    config = CXRPhantomConfig(size=16, train_size=64, val_size=1, test_size=1)
    out = tools.export_dataset("cxr-phantom", config, tmp_path / "out", 24)
    assert len(list((out / "images").glob("*.tif"))) == 24
    with (out / "attributes.csv").open() as f:
        splits = [r["split"] for r in csv.DictReader(f)]
    assert splits.count("train") == 22 and splits.count("val") == 1 and splits.count("test") == 1
    with pytest.raises(UserError, match="only 66 samples"):
        tools.export_dataset("cxr-phantom", config, tmp_path / "more", 67)
