"""docs/data.md against the code: its complete example folder loads and passes `segcft data
check`, and its dataset.yaml key table lists exactly the keys read_spec reads."""

from __future__ import annotations

import ast
import csv
import inspect
import io
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

tifffile = pytest.importorskip("tifffile")
torch = pytest.importorskip("torch")

from segcft.data import folder, tiff, tools  # noqa: E402
from segcft.data.configs import TiffConfig  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def _block(text: str, marker: str, lang: str) -> str:
    """The fenced ``lang`` block right after the HTML comment ``<!-- example: marker -->``."""
    found = re.findall(rf"<!-- example: {re.escape(marker)} -->\s*```{lang}\n(.*?)```", text, re.S)
    assert len(found) == 1, f"docs/data.md: expected one ```{lang} block after <!-- example: {marker} -->"
    return found[0]


def _example(tmp_path: Path) -> tuple[Path, dict, list[dict[str, str]], tuple[int, int]]:
    """Write the documented example folder (yaml, csv and generated TIFF files) under tmp_path."""
    text = DOC.read_text(encoding="utf-8")
    spec_text = _block(text, "dataset.yaml", "yaml")
    csv_text = _block(text, "attributes.csv", "csv")
    files = text.split("<!-- example: files -->", 1)[1]
    m = re.search(r"`images/<id>\.tif` is a (\d+) x (\d+) `uint16`", files)
    assert m, "docs/data.md: the example's files paragraph must give the image shape"
    shape = (int(m.group(1)), int(m.group(2)))
    spec = yaml.safe_load(spec_text)
    masks_text = files.split("`masks/<id>.tif`", 1)[1].split("`regions/<id>.tif`", 1)[0]
    regions_text = files.split("`regions/<id>.tif`", 1)[1].split(".", 1)[0]
    said = {int(k): n for k, n in re.findall(r"(\d+) \((\w+)\)", masks_text)}
    assert said == {0: "background", **spec["structures"]}, "the files paragraph's mask labels differ from structures"
    said = {int(k): n for k, n in re.findall(r"(\d+) \((\w+)\)", regions_text)}
    assert said == spec["regions"], "the files paragraph's region ids differ from regions"
    area = re.search(r"heart of (\d+) pixels then gives `heart_area` = .* = ([\d.]+) mm\^2", files)
    assert area and int(area.group(1)) * float(np.prod(spec["spacing"])) == float(area.group(2))
    rows = list(csv.DictReader(io.StringIO(csv_text)))

    root = tmp_path / spec["name"]
    for sub in ("images", "masks", "regions"):
        (root / sub).mkdir(parents=True)
    (root / folder.SPEC_FILE).write_text(spec_text, encoding="utf-8")
    (root / folder.CSV_FILE).write_text(csv_text, encoding="utf-8")

    label = {name: k for k, name in spec["structures"].items()}
    region = {name: k for k, name in spec["regions"].items()}
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    for r in rows:
        age = float(r["age"])
        mask = np.zeros(shape, np.uint8)
        for cx in (w // 4, 3 * w // 4):
            mask[((yy - h // 2) / (0.35 * h)) ** 2 + ((xx - cx) / (0.18 * w)) ** 2 <= 1] = label["lung"]
        rad = 0.1 * h + 0.05 * h * age / 100
        mask[(yy - h // 2) ** 2 + (xx - w // 2 - 2) ** 2 <= rad**2] = label["heart"]
        image = rng.integers(0, 200, shape) + 600 * (mask > 0)
        regions = np.where(xx < w // 2, region["left"], region["right"]).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"{r['id']}.tif", image.astype(np.uint16))
        tifffile.imwrite(root / "masks" / f"{r['id']}.tif", mask)
        tifffile.imwrite(root / "regions" / f"{r['id']}.tif", regions)
    return root, spec, rows, shape


def test_example_folder_checks_and_loads(tmp_path):
    root, spec, rows, shape = _example(tmp_path)
    assert tools.check_dataset(root) == []

    names = list(spec["variables"])
    voxel = float(np.prod(spec["spacing"]))
    for split in folder.SPLIT_NAMES:
        ds = tiff.build(TiffConfig(path=str(root)), split)
        assert ds.ids == [r["id"] for r in rows if r["split"] == split]
        item = ds[0]
        assert set(item) == {"image", "mask", "regions", "parents", "index"}
        assert item["image"].shape == (1, *shape) and item["image"].dtype == torch.float32
        assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
        assert item["mask"].shape == shape and item["mask"].dtype == torch.int64
        assert item["regions"].shape == shape and item["regions"].dtype == torch.int64
        assert item["parents"].shape == (len(names),)
        # classes: 0 background, then the declared labels in increasing order
        raw = tifffile.imread(root / "masks" / f"{ds.ids[0]}.tif")
        for cls, lab in enumerate(sorted(spec["structures"]), start=1):
            assert torch.equal(item["mask"] == cls, torch.from_numpy(raw == lab))
        # structure variables without a column: voxel count times voxel size (mm^2 in 2D)
        phys = ds.physical_parents()
        for i, sid in enumerate(ds.ids):
            mask = tifffile.imread(root / "masks" / f"{sid}.tif")
            reg = tifffile.imread(root / "regions" / f"{sid}.tif")
            for j, name in enumerate(names):
                meas = spec["variables"][name].get("measure")
                if meas is None:
                    assert phys[i, j] == pytest.approx(float(rows[[r["id"] for r in rows].index(sid)][name]))
                    continue
                lab = {n: k for k, n in spec["structures"].items()}[meas["structure"]]
                sel = mask == lab
                if meas.get("region"):
                    sel &= reg == {n: k for k, n in spec["regions"].items()}[meas["region"]]
                assert phys[i, j] == pytest.approx(sel.sum() * voxel)


def test_broken_example_is_reported(tmp_path):
    """The check the example passes is a real one: a label outside structures is reported."""
    root, _, rows, _ = _example(tmp_path)
    p = root / "masks" / f"{rows[0]['id']}.tif"
    mask = tifffile.imread(p)
    mask[0, 0] = 3
    tifffile.imwrite(p, mask)
    assert [pr.file for pr in tools.check_dataset(root)] == [f"masks/{rows[0]['id']}.tif"]


def _keys_read(func: object, var: str) -> set[str]:
    """String keys that ``func`` reads from its dict ``var``: ``var.get("k")``, ``var["k"]``, ``"k" in var``."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(func))):  # type: ignore[arg-type]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            target, key = node.func.value, node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            target, key = node.comparators[0], node.left
        else:
            continue
        named = isinstance(target, ast.Name) and target.id == var
        if named and isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
    return keys


def test_key_table_matches_read_spec():
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- keys: dataset.yaml -->", 1)[1].strip().split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    code = _keys_read(folder.read_spec, "data")
    code |= {f"intensity.{k}" for k in _keys_read(folder._read_intensity, "inten")}
    code |= {f"variables.<name>.{k}" for k in _keys_read(folder._read_variable, "v")}
    code |= {f"variables.<name>.measure.{k}" for k in _keys_read(folder._read_measure, "m")}
    code |= {f"splits.{k}" for k in (*folder.SPLIT_NAMES, *_keys_read(folder._read_splits, "raw_split"))}
    # intensity's forms are described in its type column and in the Intensity section
    assert documented | {"intensity.min", "intensity.max", "intensity.percentiles"} == code
    assert {"name", "spatial_dims", "spacing", "structures", "variables"} <= documented
