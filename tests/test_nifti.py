"""The ``nifti`` dataset: a small CT-like cohort written here (voxel sizes and orientations
varying across subjects, intensities in HU) checked, measured, loaded in canonical RAS+
orientation at one spacing, refused when broken, and trained on end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from segcft.cli import cli
from segcft.data.configs import NiftiConfig
from segcft.errors import DatasetError

nib = pytest.importorskip("nibabel")

ROOT = Path(__file__).resolve().parents[1]
FOV = (24.0, 24.0, 32.0)  # mm along R, A, S

# (voxel sizes along R, A, S; orientation of the stored array; split)
SUBJECTS = [
    ((1.0, 1.0, 2.0), "RAS", "train"),
    ((0.8, 0.8, 1.5), "LPS", "train"),
    ((1.0, 1.0, 2.0), "SAR", "train"),
    ((0.8, 0.8, 1.5), "RAS", "train"),
    ((1.0, 1.0, 2.0), "LPS", "val"),
    ((0.8, 0.8, 1.5), "RAS", "val"),
    ((1.0, 1.0, 2.0), "RAS", "test"),
    ((0.8, 0.8, 1.5), "LPS", "test"),
]


def _canonical(sizes: tuple[float, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    """HU image and label mask on an (R, A, S) grid: a lesion (label 1) growing with ``k`` near
    the centre and a marker (label 2) in the right-anterior-superior corner."""
    shape = tuple(round(f / s) for f, s in zip(FOV, sizes))
    rng = np.random.default_rng(k)
    img = rng.normal(0.0, 20.0, shape).astype(np.float32)
    img[:2] = -1000.0  # air on the left edge
    mask = np.zeros(shape, dtype=np.uint8)
    c = [n // 2 for n in shape]
    r = [max(1, round((3.0 + k) / s)) for s in sizes]
    mask[c[0] - r[0] : c[0] + r[0], c[1] - r[1] : c[1] + r[1], c[2] - r[2] : c[2] + r[2]] = 1
    corner = tuple(slice(n - max(1, round(4.0 / s)), n) for n, s in zip(shape, sizes))
    mask[corner] = 2
    img[mask == 1] = 60.0
    img[mask == 2] = 400.0
    return img, mask


def _store(arr: np.ndarray, sizes: tuple[float, ...], orient: str) -> tuple[np.ndarray, np.ndarray]:
    """The array and affine of an (R, A, S) array stored as ``orient`` (RAS, LPS or SAR)."""
    aff = np.eye(4)
    if orient == "RAS":
        aff[:3, :3] = np.diag(sizes)
        return arr, aff
    if orient == "LPS":
        aff[:3, :3] = np.diag([-sizes[0], -sizes[1], sizes[2]])
        aff[:3, 3] = [sizes[0] * (arr.shape[0] - 1), sizes[1] * (arr.shape[1] - 1), 0.0]
        return arr[::-1, ::-1].copy(), aff
    aff[:3, :3] = 0.0
    aff[2, 0], aff[1, 1], aff[0, 2] = sizes[2], sizes[1], sizes[0]
    return arr.transpose(2, 1, 0).copy(), aff


def _spec(spacing: list[float] | None = None) -> dict:
    spec = {
        "name": "ct-toy",
        "spatial_dims": 3,
        "intensity": {"min": -1000, "max": 1000},
        "structures": {1: "lesion", 2: "marker"},
        "variables": {
            "age": {"type": "continuous", "unit": "years"},
            "lesion_volume": {
                "type": "continuous",
                "parents": ["age"],
                "unit": "mm^3",
                "measure": {"structure": "lesion"},
            },
        },
    }
    if spacing is not None:
        spec["spacing"] = spacing
    return spec


def write_cohort(root: Path, spacing: list[float] | None = None) -> Path:
    """Write the cohort: dataset.yaml, attributes.csv, images/ and masks/ as .nii.gz."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k, (sizes, orient, split) in enumerate(SUBJECTS):
        sid = f"s{k}"
        img, mask = _canonical(sizes, k % 3)
        a, aff = _store(img, sizes, orient)
        m, _ = _store(mask, sizes, orient)
        nib.save(nib.Nifti1Image(a, aff), str(root / "images" / f"{sid}.nii.gz"))
        nib.save(nib.Nifti1Image(m, aff), str(root / "masks" / f"{sid}.nii.gz"))
        rows.append([sid, split, 40 + 5 * k])
    (root / "dataset.yaml").write_text(yaml.safe_dump(_spec(spacing), sort_keys=False))
    with (root / "attributes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "age"])
        w.writerows(rows)
    return root


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    return write_cohort(tmp_path / "ct")


def _build(root: Path, split: str = "train", **kw):
    from segcft.data import nifti

    return nifti.build(NiftiConfig(path=str(root), **kw), split)


def test_check_ok_and_measure_in_original_voxels(cohort, tmp_path):
    res = CliRunner().invoke(cli, ["data", "check", str(cohort)], prog_name="segcft")
    assert res.exit_code == 0, res.output
    assert res.output.strip().endswith(": ok")
    out = tmp_path / "measured.csv"
    res = CliRunner().invoke(cli, ["data", "measure", str(cohort), "--out", str(out)], prog_name="segcft")
    assert res.exit_code == 0, res.output
    with out.open() as f:
        got = {r["id"]: float(r["lesion_volume"]) for r in csv.DictReader(f)}
    for k, (sizes, _, _) in enumerate(SUBJECTS):
        mask = np.asanyarray(nib.load(str(cohort / "masks" / f"s{k}.nii.gz")).dataobj)
        voxel = float(np.prod(sizes))  # the header stores it as float32: rel 1e-6
        assert got[f"s{k}"] == pytest.approx(float((mask == 1).sum()) * voxel, rel=1e-6)


def test_items_canonical_orientation_and_median_spacing(cohort):
    ds = _build(cohort)
    # median voxel sizes of the training subjects, (D, H, W) = (S, A, R)
    assert ds.info.spacing == pytest.approx((1.75, 0.9, 0.9))
    assert ds.info.shape == (18, 27, 27)  # 32 / 1.75, 24 / 0.9 rounded
    for i, sid in enumerate(ds.ids):
        item = ds[i]
        assert item["image"].shape == (1, 18, 27, 27) and item["mask"].shape == (18, 27, 27)
        assert float(item["image"].min()) >= -1.0 and float(item["image"].max()) <= 1.0
        mask = item["mask"].numpy()
        # the marker (class 2) sits in the superior-anterior-right corner: the last indices
        d, h, w = np.nonzero(mask == 2)
        assert d.max() == 17 and h.max() == 26 and w.max() == 26, sid
        assert d.min() > 9 and h.min() > 13 and w.min() > 13, sid
        assert float(item["image"][0, -1, -1, -1]) == pytest.approx(0.4, abs=0.02)  # 400 HU
        # air on the left: low W indices
        assert float(item["image"][0][:, :, 0].mean()) == pytest.approx(-1.0, abs=0.05)
        geom = ds.geometry(sid)
        k = int(sid[1:])
        assert geom.shape == nib.load(str(cohort / "images" / f"{sid}.nii.gz")).shape
        assert np.allclose(geom.affine, nib.load(str(cohort / "images" / f"{sid}.nii.gz")).affine)
        assert sorted(geom.spacing) == pytest.approx(sorted(SUBJECTS[k][0]))


def test_declared_spacing_and_size(tmp_path):
    root = write_cohort(tmp_path / "ct", spacing=[2.0, 3.0, 3.0])
    ds = _build(root, size=(16, 8, 8))
    assert ds.info.spacing == (2.0, 3.0, 3.0) and ds.info.shape == (16, 8, 8)
    assert ds[1]["mask"].shape == (16, 8, 8) and int(ds[1]["mask"][-1, -1, -1]) == 2


def _rewrite(path: Path, change) -> None:
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj).copy()
    arr = change(arr)
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))


def test_undeclared_label_refused(cohort):
    def relabel(a):
        a[a == 2] = 7
        return a

    _rewrite(cohort / "masks" / "s1.nii.gz", relabel)
    res = CliRunner().invoke(cli, ["data", "check", str(cohort)], prog_name="segcft")
    assert res.exit_code == 2
    assert "masks/s1.nii.gz [structures]: labels [7] are not declared" in res.output
    with pytest.raises(DatasetError, match=r"masks/s1\.nii\.gz: labels \[7\] are not declared") as err:
        _build(cohort)  # lesion_volume is measured from the masks as the dataset loads
    assert "\n" not in str(err.value)


def test_nan_image_refused(cohort):
    def poison(a):
        a = a.astype(np.float32)
        a[3, 4, 5] = np.nan
        return a

    _rewrite(cohort / "images" / "s2.nii.gz", poison)
    res = CliRunner().invoke(cli, ["data", "check", str(cohort)], prog_name="segcft")
    assert res.exit_code == 2 and "images/s2.nii.gz: image contains NaN" in res.output
    ds = _build(cohort)
    with pytest.raises(DatasetError, match=r"images/s2\.nii\.gz: image contains NaN.*at voxel \(3, 4, 5\)") as err:
        ds[ds.ids.index("s2")]
    assert "\n" not in str(err.value)


def test_grid_mismatch_and_missing_file(cohort):
    (cohort / "masks" / "s3.nii.gz").unlink()
    img = nib.load(str(cohort / "masks" / "s4.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine), str(cohort / "masks" / "s4.nii.gz"))
    res = CliRunner().invoke(cli, ["data", "check", str(cohort)], prog_name="segcft")
    assert res.exit_code == 2
    assert "masks/s3.nii.gz: missing mask file" in res.output
    assert "masks/s4.nii.gz: grid (shape" in res.output


def test_missing_nibabel_names_the_extra(cohort, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(DatasetError, match=r'pip install "segcft\[nifti\]"'):
        _build(cohort)


@pytest.mark.timeout(300)
def test_smoke_training_on_nifti(tmp_path):
    root = write_cohort(tmp_path / "ct", spacing=[2.0, 3.0, 3.0])
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segcft", "train", "--preset", "smoke", "--dataset", "nifti",
           "--generator", "hvae", "--segmentor", "unet", "--run-dir", str(run_dir), "--device", "cpu",
           "--set", f"dataset.path={root}", "--set", "dataset.size=[16,8,8]", "--set", "generator.preset=3d",
           "--set", "evaluate.n=2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = run_dir / "report.md"
    assert report.is_file() and proc.stdout.strip().splitlines()[-1] == f"report: {report}"


def test_oversized_header_and_outside_file_refused(cohort, tmp_path):
    """A header declaring more than MAX_VOXELS voxels is refused before any decoding; a file
    that resolves outside the dataset folder is never read."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 128))
    hdr.set_data_dtype(np.uint8)
    (cohort / "images" / "s0.nii.gz").unlink()
    (cohort / "images" / "s0.nii").write_bytes(hdr.binaryblock + b"\0" * 4)  # header only, no voxels
    outside = tmp_path / "elsewhere.nii.gz"
    (cohort / "masks" / "s5.nii.gz").rename(outside)
    (cohort / "masks" / "s5.nii.gz").symlink_to(outside)
    res = CliRunner().invoke(cli, ["data", "check", str(cohort)], prog_name="segcft")
    assert res.exit_code == 2
    assert "images/s0.nii: shape (2048, 2048, 128) has 536870912 voxels, more than the limit" in res.output
    assert "outside the dataset folder" in res.output


def test_show_montage(cohort, tmp_path):
    res = CliRunner().invoke(cli, ["data", "show", str(cohort), "--out", str(tmp_path / "m.png")], prog_name="segcft")
    assert res.exit_code == 0, res.output
    assert "3D, shape [18, 27, 27]" in res.output and (tmp_path / "m.png").is_file()


def test_one_slice_items_and_write_back_grid(tmp_path):
    """A 2D folder of one-slice files (RAS and LPS, 1 mm) loaded at size 20 x 20 (a centre crop):
    items are the file's slice in (A, R) order; ``grid_to_file`` puts a grid map back on each
    file's own 2D grid, equal to the windowed file where the crop kept it and 0 where it cut."""
    from segcft.data import nifti
    from segcft.data.folder import window

    root = tmp_path / "slices"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for k, orient in enumerate(["RAS", "LPS", "RAS", "LPS"]):
        img, mask = _canonical((1.0, 1.0, 2.0), k % 3)
        img[-4:, -4:, 8], mask[-4:, -4:, 8] = 400.0, 2  # the marker, brought down to the lesion's slice
        a, aff = _store(img[:, :, 8:9], (1.0, 1.0, 2.0), orient)
        m, _ = _store(mask[:, :, 8:9], (1.0, 1.0, 2.0), orient)
        nib.save(nib.Nifti1Image(a[:, :, 0], aff), str(root / "images" / f"s{k}.nii.gz"))
        nib.save(nib.Nifti1Image(m[:, :, 0], aff), str(root / "masks" / f"s{k}.nii.gz"))
        rows.append([f"s{k}", "train" if k < 2 else "test", 40 + k])
    spec = _spec() | {"spatial_dims": 2}
    spec["variables"]["lesion_volume"]["unit"] = "mm^2"
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with (root / "attributes.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["id", "split", "age"], *rows])
    ds = _build(root, size=(20, 20))
    assert ds.info.spatial_dims == 2 and ds.info.shape == (20, 20) and ds.info.spacing == pytest.approx((1.0, 1.0))
    for i, sid in enumerate(ds.ids):
        item, geom = ds[i], ds.geometry(sid)
        assert ds.image_path(sid) == root / "images" / f"{sid}.nii.gz"
        arr, _, _ = nifti.read_image(ds.image_path(sid))
        unit = window(arr, ds.spec)
        grid = nifti.image_to_grid(unit, geom, ds.info.spacing, ds.info.shape)
        assert grid.shape == (20, 20) and np.array_equal(grid.numpy(), item["image"][0].numpy())
        back = nifti.grid_to_file(item["image"][0].numpy(), geom, ds.info.spacing)
        assert back.shape == geom.shape
        # in (R, A) order the crop kept indices 2..21 of the 24 x 24 slice, whatever the file's orientation
        ras = back[::-1, ::-1, 0] if geom.affine[0, 0] < 0 else back[:, :, 0]
        want = (unit[::-1, ::-1, 0] if geom.affine[0, 0] < 0 else unit[:, :, 0])[2:22, 2:22]
        np.testing.assert_allclose(ras[2:22, 2:22], want, atol=1e-6)
        assert not ras[:2].any() and not ras[22:].any() and not ras[:, :2].any() and not ras[:, 22:].any()
        assert item["image"][0, -1, -1] == pytest.approx(0.4, abs=0.02)  # the marker, anterior-right
