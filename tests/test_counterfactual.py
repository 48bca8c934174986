"""Single what-ifs (``segcft.evaluate.counterfactual_with``) on the toy run: intervention
parsing, TIFF files in and out (dtype, range, spacing), sample ids, abducted parents, and one
clear UserError for every bad argument."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from segcft.errors import UserError
from segcft.evaluate import ParsedIntervention, counterfactual_with, parse_intervention

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy():
    from _toy_run import INFO, make_toy_run, render

    return make_toy_run(), INFO, render


def test_parse_intervention_forms(toy):
    _, info, _ = toy
    assert parse_intervention("age=70", info) == ParsedIntervention("age", "absolute", 70.0)
    assert parse_intervention("blob_area=+20%", info) == ParsedIntervention("blob_area", "relative", 20.0)
    assert parse_intervention(" blob_area = -10.5% ", info) == ParsedIntervention("blob_area", "relative", -10.5)
    assert parse_intervention("blob_area=x1.2", info) == ParsedIntervention("blob_area", "factor", 1.2)
    assert parse_intervention("blob_area=x1.2", info).apply(100.0) == pytest.approx(120.0)
    assert parse_intervention("blob_area=+20%", info).apply(100.0) == pytest.approx(120.0)
    assert parse_intervention("blob_area=-25%", info).apply(100.0) == pytest.approx(75.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lung=3", "unknown variable 'lung'"),
        ("age", "expected VARIABLE=VALUE"),
        ("age=old", "cannot read 'old'"),
        ("age=20%%", "cannot read"),
        ("blob_area=x-2", "factor must be >= 0"),
        ("age=nan", "cannot read"),
    ],
)
def test_parse_intervention_errors(toy, text, message):
    _, info, _ = toy
    with pytest.raises(UserError, match=message):
        parse_intervention(text, info)


def _write_input(path, render, info, dtype=np.uint16, spacing=(2.0, 2.0), blob=300.0):
    exo = torch.tensor([[0.1]])
    pa = torch.tensor([[50.0, blob, 150.0]], dtype=torch.float64)
    img, _, _ = render(exo, pa)
    arr = ((img[0, 0].numpy() + 1.0) / 2.0 * 4000 + 100).round().astype(dtype)
    tifffile.imwrite(path, arr, resolution=(10.0 / spacing[1], 10.0 / spacing[0]), resolutionunit="CENTIMETER")
    return arr


def test_file_roundtrip_dtype_range_spacing_and_areas(tmp_path, toy):
    run, info, render = toy
    src = tmp_path / "in.tif"
    arr = _write_input(src, render, info)
    out = tmp_path / "cf.tif"
    lines: list[str] = []
    res = counterfactual_with(run, str(src), ["blob_area=+20%"], out, png=tmp_path / "cf.png", mode="oracle", echo=lines.append)
    assert res["abducted"] is True
    assert any("parents abducted" in line for line in lines)
    v = res["variables"]["blob_area"]
    assert v["before"] == pytest.approx(300.0)  # the guide measures the file exactly
    assert v["intended"] == pytest.approx(360.0)
    assert v["measured_after"] == pytest.approx(360.0, abs=2.0)
    spot = res["variables"]["spot_area"]
    assert spot["measured_after"] == pytest.approx(spot["measured_before"])
    with tifffile.TiffFile(out) as tif:
        cf = tif.asarray()
        xr = tif.pages.first.tags["XResolution"].value
    assert cf.dtype == np.uint16 and cf.shape == arr.shape
    assert cf.min() == arr.min() and cf.max() == arr.max()
    assert 10.0 * xr[1] / xr[0] == pytest.approx(2.0)
    # outside the blob the output is the input, bit for bit
    changed = cf != arr
    assert changed.sum() == pytest.approx(60.0 / 4.0, abs=1)
    assert (tmp_path / "cf.png").stat().st_size > 1000
    # the written file reads back with its spacing: a second what-if starts where the first ended
    res2 = counterfactual_with(run, str(out), ["blob_area=x1.0"], tmp_path / "cf2.tif", mode="oracle", echo=lines.append)
    assert res2["spacing"] == [2.0, 2.0]
    assert res2["variables"]["blob_area"]["before"] == pytest.approx(360.0)


def test_one_slice_nifti_file_on_a_2d_run(tmp_path, toy):
    """A one-slice NIfTI file (stored L-P flipped, 2 mm pixels) goes onto a 2D run's grid as the
    TIFF does and comes back with its own header, shape and orientation."""
    nib = pytest.importorskip("nibabel")
    run, info, render = toy
    arr = _write_input(tmp_path / "in.tif", render, info)  # (H, W) = (A, R)
    stored = arr.T[::-1, ::-1].copy()  # (R, A), both axes flipped: LPS
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:2, 3] = [2.0 * (stored.shape[0] - 1), 2.0 * (stored.shape[1] - 1)]
    nib.save(nib.Nifti1Image(stored, affine), str(tmp_path / "in.nii.gz"))
    res = counterfactual_with(run, tmp_path / "in.nii.gz", ["blob_area=+20%"], tmp_path / "cf.nii.gz", mode="oracle", echo=lambda s: None)
    v = res["variables"]["blob_area"]
    assert v["before"] == pytest.approx(300.0) and v["measured_after"] == pytest.approx(360.0, abs=2.0)
    out = nib.load(str(tmp_path / "cf.nii.gz"))
    cf = np.asanyarray(out.dataobj)
    assert cf.shape == stored.shape and cf.dtype == np.uint16 and np.allclose(out.affine, affine)
    changed = cf[::-1, ::-1].T != arr  # back in (A, R): only the blob's rim moved
    assert changed.sum() == pytest.approx(60.0 / 4.0, abs=1)
    counterfactual_with(run, tmp_path / "in.tif", ["blob_area=+20%"], tmp_path / "cf.tif", mode="oracle", echo=lambda s: None)
    assert np.array_equal(cf[::-1, ::-1].T, tifffile.imread(tmp_path / "cf.tif"))  # the same pixels as the TIFF's


def test_descendants_follow_and_identity_generator_misses(tmp_path, toy):
    run, info, render = toy
    src = tmp_path / "in.tif"
    _write_input(src, render, info, dtype=np.float32)
    res = counterfactual_with(run, src, ["age=+10%"], tmp_path / "cf.tif", mode="identity", echo=lambda s: None)
    v = res["variables"]["blob_area"]
    # the regressor predicts the mean age; +10% of it moves blob_area by 2 mm^2 per year
    age = info.normalisation.mean[0]
    assert v["intended"] - v["before"] == pytest.approx(2.0 * 0.1 * age, rel=1e-5)
    assert v["measured_after"] == pytest.approx(v["measured_before"])  # identity ignores it
    assert tifffile.imread(tmp_path / "cf.tif").dtype == np.float32


def test_sample_id_uses_recorded_parents_and_particles(tmp_path, toy):
    run, info, _ = toy
    res = counterfactual_with(run, "test:3", ["spot_area=120"], tmp_path / "cf.tif", particles=3, mode="oracle", echo=lambda s: None)
    assert res["abducted"] is False
    recorded = info.denormalise(run.dataset("test")[3]["parents"].double())
    assert res["variables"]["age"]["before"] == pytest.approx(float(recorded[0]), rel=1e-6)
    assert res["variables"]["spot_area"]["measured_after"] == pytest.approx(120.0, abs=2.0)
    assert res["uncertainty"] is not None
    assert tifffile.imread(res["uncertainty"]).shape == info.shape
    assert res["mode"] == "oracle"
    default = counterfactual_with(run, "3", ["spot_area=120"], tmp_path / "d.tif", echo=lambda s: None)
    assert default["mode"] == "identity"  # none of pos-seg, seg, reg, none: the first generator


@pytest.mark.parametrize(
    "input_, do, message",
    [
        ("test:999", ["age=60"], "has 40 samples"),
        ("missing.tif", ["age=60"], "no such TIFF file"),
        ("test:1", ["blob_area=-200%"], "is negative"),
        ("test:1", ["age=60", "age=61"], "given twice"),
        ("test:1", ["weight=3"], "unknown variable"),
    ],
)
def test_bad_arguments_raise_one_line(tmp_path, toy, input_, do, message):
    run, _, _ = toy
    with pytest.raises(UserError, match=message) as e:
        counterfactual_with(run, input_, do, tmp_path / "cf.tif", echo=lambda s: None)
    assert "\n" not in str(e.value)


def test_shape_mismatch_and_3d_input(tmp_path, toy):
    run, _, _ = toy
    tifffile.imwrite(tmp_path / "small.tif", np.arange(64, dtype=np.uint8).reshape(8, 8))
    with pytest.raises(UserError, match=r"does not fit the run's 2D images of shape \(16, 16\)"):
        counterfactual_with(run, tmp_path / "small.tif", ["age=60"], tmp_path / "cf.tif", echo=lambda s: None)
    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((4, 16, 16), dtype=np.uint8), photometric="minisblack")
    with pytest.raises(UserError, match="does not fit"):
        counterfactual_with(run, tmp_path / "vol.tif", ["age=60"], tmp_path / "cf.tif", echo=lambda s: None)
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(UserError, match="constant"):
        counterfactual_with(run, tmp_path / "flat.tif", ["age=60"], tmp_path / "cf.tif", echo=lambda s: None)


def test_oversized_input_tiff_is_refused_from_its_header(tmp_path):
    """`segcft counterfactual --input` reads TIFFs through the same header check as datasets: a
    file declaring more than MAX_VOXELS voxels is refused before anything is decoded."""
    import numpy as np
    import tifffile

    from segcft.data.imageio import MAX_VOXELS, read_tiff
    from segcft.errors import UserError

    path = tmp_path / "huge.tif"
    with tifffile.TiffWriter(path) as tw:  # header only: the pixel data are never written
        tw.write(shape=(2**15, 2**14 + 1), dtype=np.uint8)
    assert (2**15) * (2**14 + 1) > MAX_VOXELS
    with pytest.raises(UserError, match=r"huge.tif: cannot read the TIFF file: .* more than the limit"):
        read_tiff(path)
