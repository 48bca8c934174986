"""``segcft counterfactual`` on real-format data: NIfTI files and subject ids of a NIfTI cohort
(voxel sizes and orientations varying, intensities in HU) in, the counterfactual written back
on the input's grid, in HU and the input's dtype, a difference map, the PNG, and one line with
exit 2 for every bad argument. Exact stub components check the geometry; one smoke run, shared
by the module, checks the command end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from segcft.cli import cli
from segcft.config import RunConfig
from segcft.data.configs import NiftiConfig, TiffConfig
from segcft.errors import UserError
from segcft.evaluate import counterfactual_with

nib = pytest.importorskip("nibabel")

from test_nifti import SUBJECTS, write_cohort  # noqa: E402  (needs nibabel)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 8, 8)  # the cohort's 32 x 24 x 24 mm field of view at 2 x 3 x 3 mm
WINDOW = (-1000.0, 1000.0)


class ThresholdSegmentor(nn.Module):
    """Exact segmentation of the cohort: lesion at 60 HU (0.06), marker at 400 HU (0.4)."""

    classes = ("background", "lesion", "marker")
    spatial_dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0]
        labels = torch.where(v > 0.25, 2, torch.where((v > 0.045) & (v < 0.2), 1, 0))
        return 40.0 * nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()


class SetSCM(nn.Module):
    """Intervened variables take their values; nothing else changes."""

    def forward(self, pa: torch.Tensor) -> torch.Tensor:
        return pa

    def counterfactual(self, pa: torch.Tensor, interventions: dict[str, torch.Tensor]) -> torch.Tensor:
        out = pa.clone()
        for name, v in interventions.items():
            out[:, 1 if name == "lesion_volume" else 0] = v.to(pa.dtype)
        return out


class CornerGenerator(nn.Module):
    """Adds 0.3 (300 HU) to the superior-anterior-right corner of the run's grid (the last two
    indices of D, H and W), or changes nothing (``shift=0``)."""

    spatial_dims = 3

    def __init__(self, shift: float = 0.3) -> None:
        super().__init__()
        self.shift = shift

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = x.clone()
        out[..., -2:, -2:, -2:] = (out[..., -2:, -2:, -2:] + self.shift).clamp(-1.0, 1.0)
        return out, (torch.full_like(x, 0.01) if particles > 1 else None)


class ZeroRegressor(nn.Module):
    spatial_dims = 3

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = x.new_zeros(x.shape[0], 2)
        return {"loc": z, "scale": torch.ones_like(z)}


@dataclass
class StubRun:
    """The attributes of ``segcft.run.Run`` a what-if uses, on the NIfTI cohort."""

    root: Path
    config: RunConfig = field(default_factory=RunConfig)
    device: str = "cpu"
    mechanisms: nn.Module = field(default_factory=SetSCM)
    segmentor: nn.Module = field(default_factory=ThresholdSegmentor)
    eval_segmentor: nn.Module = field(default_factory=ThresholdSegmentor)
    regressor: nn.Module = field(default_factory=ZeroRegressor)
    generators: dict[str, nn.Module] = field(
        default_factory=lambda: {"corner": CornerGenerator(), "identity": CornerGenerator(0.0)}
    )

    def __post_init__(self) -> None:
        self.config.dataset.name = "nifti"
        self.info = self.dataset("test").info

    def dataset(self, split: str) -> Any:
        from segcft.data import nifti

        return nifti.build(NiftiConfig(path=str(self.root), size=SIZE), split)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cf") / "ct", spacing=[2.0, 3.0, 3.0])


@pytest.fixture(scope="module")
def stub(cohort) -> StubRun:
    return StubRun(cohort)


def _load(path: Path) -> tuple[np.ndarray, Any]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def _quiet(s: str) -> None:
    pass


def _store_sra(cohort: Path, folder: str, to: Path) -> Path:
    """Subject s0 (stored RAS at 1 x 1 x 2 mm) stored again with axes (S, R, A): a cyclic
    permutation, which unlike flips and swaps is not its own inverse."""
    arr, _ = _load(cohort / folder / "s0.nii.gz")
    aff = np.zeros((4, 4))
    aff[2, 0], aff[0, 1], aff[1, 2], aff[3, 3] = 2.0, 1.0, 1.0, 1.0
    to.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 0, 1)), aff), str(to))
    return to


@pytest.mark.parametrize("k", [0, 1, 2, 5, "SRA"])  # RAS, LPS, SAR, RAS at 0.8 x 0.8 x 1.5 mm, SRA
def test_nifti_file_written_back_on_its_own_grid(tmp_path, stub, cohort, k):
    if k == "SRA":
        src = _store_sra(cohort, "images", tmp_path / "sra" / "image.nii.gz")
        mask_file = _store_sra(cohort, "masks", tmp_path / "sra" / "mask.nii.gz")
    else:
        src, mask_file = cohort / "images" / f"s{k}.nii.gz", cohort / "masks" / f"s{k}.nii.gz"
    out, diff = tmp_path / "cf.nii.gz", tmp_path / "diff.nii"
    res = counterfactual_with(stub, src, ["lesion_volume=x1.2"], out, diff=diff, mode="corner", echo=_quiet)
    assert res["abducted"] is True and res["format"] == "nifti"
    x, img = _load(src)
    y, got = _load(out)
    assert got.shape == img.shape and np.allclose(got.affine, img.affine, atol=1e-6)
    assert np.allclose(got.header.get_zooms(), img.header.get_zooms(), rtol=1e-6)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(img.affine)
    assert got.get_data_dtype() == img.get_data_dtype()
    assert WINDOW[0] <= y.min() and y.max() <= WINDOW[1]
    # the model brightened the superior-anterior-right corner, where the marker (label 2) is,
    # whatever the file's orientation; far from that corner the file is the input, exactly
    mask, _ = _load(mask_file)
    change = y.astype(np.float64) - np.clip(x, *WINDOW)
    assert change[mask == 2].mean() > 100.0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in x.shape], indexing="ij"), axis=-1)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]  # R, A, S in mm, 0 .. FOV
    far = (world[..., 0] < 12.0) | (world[..., 1] < 12.0) | (world[..., 2] < 16.0)
    assert far.mean() > 0.8 and np.array_equal(y[far], x[far])
    d, dimg = _load(diff)
    assert np.allclose(dimg.affine, img.affine) and d.shape == x.shape
    assert np.allclose(d, y.astype(np.float64) - x, atol=1e-3)


def test_identity_returns_the_input_within_the_window(tmp_path, stub, cohort):
    src = cohort / "images" / "s1.nii.gz"
    x, img = _load(src)
    x = x.copy()
    x[0, 0, 0] = -1500.0  # below the window: clipped, and stays what the model gives in it
    nib.save(nib.Nifti1Image(x.astype(np.int16), img.affine), str(tmp_path / "in.nii.gz"))
    counterfactual_with(stub, tmp_path / "in.nii.gz", ["age=60"], tmp_path / "cf.nii", mode="identity", echo=_quiet)
    y, got = _load(tmp_path / "cf.nii")
    assert got.get_data_dtype() == np.int16
    assert np.array_equal(y, np.clip(x.astype(np.int16), -1000, 1000))
    # a header that scales its stored integers: float32 out, the scaled values within the window
    scaled = nib.Nifti1Image(np.clip(x + 1024, 0, 4000).astype(np.int16), img.affine)
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    x2, _ = _load(tmp_path / "scaled.nii.gz")
    counterfactual_with(stub, tmp_path / "scaled.nii.gz", ["age=60"], tmp_path / "s.nii", mode="identity", echo=_quiet)
    y2, got2 = _load(tmp_path / "s.nii")
    assert got2.get_data_dtype() == np.float32 and np.array_equal(y2, np.clip(x2, -1000, 1000).astype(np.float32))


def test_subject_id_equals_its_file_and_uses_recorded_parents(tmp_path, stub, cohort):
    lines: list[str] = []
    res = counterfactual_with(
        stub, "s6", ["lesion_volume=x1.2"], tmp_path / "a.nii.gz", mode="corner", echo=lines.append, particles=2
    )
    assert res["uncertainty"] == str(tmp_path / "a_std.nii.gz")
    std, std_img = _load(tmp_path / "a_std.nii.gz")
    source = nib.load(str(cohort / "images" / "s6.nii.gz"))
    assert std.shape == source.shape and np.allclose(std_img.affine, source.affine)
    assert np.allclose(std, 100.0, atol=1e-2)  # variance 0.01 on [-1, 1]: std 0.1 = 100 HU
    assert res["abducted"] is False and res["variables"]["age"]["before"] == pytest.approx(70.0)
    assert any("subject s6" in line for line in lines)
    # test:0 is the same subject (s6 is the first of the test split)
    counterfactual_with(stub, "test:0", ["lesion_volume=x1.2"], tmp_path / "b.nii.gz", mode="corner", echo=_quiet)
    counterfactual_with(
        stub, cohort / "images" / "s6.nii.gz", ["lesion_volume=x1.2"], tmp_path / "c.nii.gz", mode="corner", echo=_quiet
    )
    a, b, c = (_load(tmp_path / f"{n}.nii.gz")[0] for n in "abc")
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not np.array_equal(a, _load(cohort / "images" / "s6.nii.gz")[0])


def test_the_file_path_maps_inputs_as_the_dataset_does(stub, cohort):
    from segcft.evaluation.cf_io import read_source

    ds = stub.dataset("train")
    for i, sid in enumerate(ds.ids):
        src = read_source(stub, str(cohort / "images" / f"{sid}.nii.gz"))
        assert torch.allclose(src.image[0], ds[i]["image"], atol=1e-6), (sid, SUBJECTS[i])


def test_png_follows_the_structure(tmp_path, stub, cohort, monkeypatch):
    import segcft.figures as figures

    figs = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, *a, **k: (figs.append(fig), save(fig, *a, **k))[1])
    x, img = _load(cohort / "images" / "s6.nii.gz")  # RAS at 1 x 1 x 2 mm
    x = x.copy()
    x[4:20, 18:21, 2:14] = 60.0  # a large lesion at A = 18..21 mm: H index 6 of the run's 3 mm grid
    nib.save(nib.Nifti1Image(x, img.affine), str(tmp_path / "in.nii.gz"))
    res = counterfactual_with(
        stub, tmp_path / "in.nii.gz", ["lesion_volume=x1.2"], tmp_path / "a.nii.gz", png=tmp_path / "a.png",
        mode="corner", echo=_quiet,
    )  # fmt: skip
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert res["section"] == 6  # not the middle section (4)
    fig = figs[-1]
    image_axes = [ax for ax in fig.axes if ax.images]
    titles = [ax.get_title() for ax in image_axes]
    assert titles[:2] == ["factual", "counterfactual"] and titles[2].startswith("counterfactual - factual")
    assert "lesion, section H = 6 of 8" in fig.get_suptitle()
    assert image_axes[0].get_xlabel() == "W (voxel)" and image_axes[0].get_ylabel() == "D (voxel)"
    assert all(ax.get_aspect() == pytest.approx(2.0 / 3.0) for ax in image_axes)
    diff_im = image_axes[2].images[0]
    assert diff_im.get_cmap().name == "RdBu_r" and diff_im.norm.vmin == pytest.approx(-diff_im.norm.vmax)


def test_focus_section_takes_the_largest_of_factual_and_counterfactual():
    from segcft.figures import focus_section

    vol = np.zeros((4, 6, 5))
    before, after = np.zeros_like(vol, dtype=bool), np.zeros_like(vol, dtype=bool)
    before[:2, 1, :2] = True  # 4 voxels at H = 1
    after[:, 4, :] = True  # 20 voxels at H = 4
    assert focus_section(vol, [before, after]) == 4
    assert focus_section(vol, [before]) == 1
    assert focus_section(vol, [np.zeros_like(before)]) == 3
    assert focus_section(np.zeros((4, 4)), [before]) is None


def _bad_header(path: Path) -> Path:
    path.write_bytes(b"not a nifti header" * 30)
    return path


def _other_fov(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "make, out, message",
    [
        (lambda d, c: d / "missing.nii.gz", "cf.nii.gz", "--input '.*missing.nii.gz': no such NIfTI file"),
        (lambda d, c: "case_999", "cf.nii.gz", "--input 'case_999': no such file, subject id .*ids such as s6, s7"),
        (lambda d, c: _bad_header(d / "bad.nii.gz"), "cf.nii.gz", r"--input .*bad.nii.gz: cannot read the NIfTI file"),
        (
            lambda d, c: _other_fov(d / "fov.nii"),
            "cf.nii.gz",
            r"resampled to the run's spacing .* has shape \(5, 3, 3\)",
        ),
        (lambda d, c: "s6", "cf.tif", "--out .*cf.tif: the input is NIfTI .*name the file with .nii.gz or .nii"),
        (lambda d, c: "test:9", "cf.nii.gz", "the test split has 2 samples"),
        (
            lambda d, c: shutil.copy(c / "images" / "s1.nii.gz", d / "in.nii.gz"),
            "in.nii.gz",
            "--out .*in.nii.gz: is the input file",
        ),
        (lambda d, c: "s6", "COHORT/cf.nii.gz", "--out .*cf.nii.gz: inside the dataset folder"),
    ],
)
def test_bad_inputs_one_line(tmp_path, stub, cohort, make, out, message):
    out_path = cohort / out[7:] if out.startswith("COHORT/") else tmp_path / out
    with pytest.raises(UserError, match=message) as e:
        counterfactual_with(stub, str(make(tmp_path, cohort)), ["age=60"], out_path, echo=_quiet)
    assert "\n" not in str(e.value)


def test_missing_nibabel_names_the_extra(tmp_path, stub, cohort, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(
        UserError, match=r'--input .*s1.nii.gz: reading NIfTI needs nibabel; pip install "segcft\[nifti\]"'
    ):
        counterfactual_with(stub, cohort / "images" / "s1.nii.gz", ["age=60"], tmp_path / "cf.nii.gz", echo=_quiet)


class ShiftGenerator(nn.Module):
    """Adds ``shift`` to the last two indices of every spatial axis, in 2D or 3D."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, None]:
        out = x.clone()
        corner = (slice(None), slice(None)) + (slice(-2, None),) * (x.dim() - 2)
        out[corner] = (out[corner] + self.shift).clamp(-1.0, 1.0)
        return out, None


@dataclass
class TiffStub:
    """A what-if run on a TIFF folder dataset fitted by ``fit`` to ``size``; recorded parents only."""

    root: Path
    size: tuple[int, ...]
    fit: str
    config: RunConfig = field(default_factory=RunConfig)
    device: str = "cpu"
    mechanisms: nn.Module = field(default_factory=SetSCM)
    segmentor: None = None
    eval_segmentor: None = None
    regressor: None = None
    generators: dict[str, nn.Module] = field(default_factory=lambda: {"shift": ShiftGenerator(0.3)})

    def __post_init__(self) -> None:
        self.config.dataset.name = "tiff"
        self.info = self.dataset("train").info

    def dataset(self, split: str) -> Any:
        from segcft.data import tiff

        return tiff.build(TiffConfig(path=str(self.root), size=self.size, fit=self.fit), split)


@pytest.fixture(scope="module")
def cxr_folder(tmp_path_factory) -> Path:
    from segcft.data import tools
    from segcft.data.configs import CXRPhantomConfig

    return tools.export_dataset("cxr-phantom", CXRPhantomConfig(), tmp_path_factory.mktemp("cxr") / "ds", 5)


@pytest.mark.parametrize("fit, size", [("crop", (40, 40)), ("resize", (32, 32))])
def test_tiff_subject_written_back_through_the_fit(cxr_folder, tmp_path, fit, size):
    import tifffile

    root = cxr_folder
    run = TiffStub(root, size, fit)
    res = counterfactual_with(run, "train_00001", ["age=60"], tmp_path / "cf.tiff", mode="shift", echo=_quiet)
    assert res["format"] == "tiff" and res["abducted"] is False
    x = tifffile.imread(root / "images" / "train_00001.tif")
    with tifffile.TiffFile(tmp_path / "cf.tiff") as tif:
        y = tif.asarray()
        assert tif.shaped_metadata[0]["spacing"] == pytest.approx(run.dataset("train").spec.spacing)
    assert y.shape == x.shape == (64, 64) and y.dtype == x.dtype
    change = y.astype(np.float64) - x
    if fit == "crop":  # the grid's corner [38:40] is the file's [50:52]; the rest is the input, exactly
        inside = np.zeros_like(change, dtype=bool)
        inside[50:52, 50:52] = True
        assert np.array_equal(y[~inside], x[~inside]) and (np.abs(change[inside]) > 0.1).any()
    else:  # resized back: only the file's bottom-right corner moves
        assert np.array_equal(y[:56], x[:56]) and np.array_equal(y[:, :56], x[:, :56])
        assert (np.abs(change[60:, 60:]) > 0.1).any()


# -- end to end on one smoke run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(cohort, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cfrun") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segcft", "train", "--preset", "smoke", "--dataset", "nifti",
           "--generator", "hvae", "--segmentor", "unet", "--run-dir", str(run_dir), "--device", "cpu",
           "--set", f"dataset.path={cohort}", "--set", "dataset.size=[16,8,8]", "--set", "generator.preset=3d",
           "--set", "evaluate.n=2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return run_dir


@pytest.mark.timeout(300)
def test_cli_subject_id_and_file_on_a_trained_run(tmp_path, smoke_run, cohort):
    out, diff, png = tmp_path / "cf.nii.gz", tmp_path / "d.nii.gz", tmp_path / "cf.png"
    args = ["counterfactual", "--run", str(smoke_run), "--do", "lesion_volume=x1.5", "--out", str(out)]
    res = CliRunner().invoke(cli, [*args, "--input", "s7", "--diff", str(diff), "--png", str(png)], prog_name="segcft")
    assert res.exit_code == 0, res.output
    x, img = _load(cohort / "images" / "s7.nii.gz")
    y, got = _load(out)
    assert got.shape == img.shape and np.allclose(got.affine, img.affine)
    assert np.allclose(got.header.get_zooms(), img.header.get_zooms())
    assert WINDOW[0] <= y.min() and y.max() <= WINDOW[1]
    assert np.allclose(_load(diff)[0], y.astype(np.float64) - x, atol=1e-3)
    assert png.stat().st_size > 1000 and f"wrote {out}, {diff}" in res.output
    res = CliRunner().invoke(cli, [*args, "--input", str(cohort / "images" / "s1.nii.gz")], prog_name="segcft")
    assert res.exit_code == 0, res.output
    assert _load(out)[1].shape == nib.load(str(cohort / "images" / "s1.nii.gz")).shape


@pytest.mark.parametrize(
    "input_, out, message",
    [
        ("nope", "cf.nii.gz", "Error: --input 'nope': no such file, subject id"),
        ("s7", "cf.png", "Error: --out "),
        ("s7", "cf.tiff", "the input is NIfTI (subject s7"),
    ],
)
def test_cli_errors_exit_2_before_the_model_loads(tmp_path, smoke_run, monkeypatch, input_, out, message):
    import segcft.run

    def never(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(segcft.run, "load_run", never)
    out_path = str(tmp_path / out)
    args = ["counterfactual", "--run", str(smoke_run), "--do", "age=60", "--input", input_, "--out", out_path]
    res = CliRunner().invoke(cli, args, prog_name="segcft")
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
