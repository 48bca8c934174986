"""Metric functions on hand-made tensors with known answers, and evaluate() end to end on a
tiny phantom run whose generators are exact (an oracle) or do nothing (identity)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from segcft.metrics import (
    abs_errors,
    bootstrap_mean,
    bootstrap_ratio,
    dilate,
    locality,
    masked_mean_abs,
    permutation,
    to_255,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_run():
    from _toy_run import make_toy_run

    return make_toy_run()


# -- pure metric functions ---------------------------------------------------------------------


def test_abs_errors_known_values_and_empty_target():
    ae, ape = abs_errors(torch.tensor([110.0, 90.0, 5.0]), torch.tensor([100.0, 100.0, 0.0]))
    assert ae.tolist() == pytest.approx([10.0, 10.0, 5.0])
    assert ape[:2].tolist() == pytest.approx([10.0, 10.0])
    assert math.isnan(float(ape[2]))
    _, ape = abs_errors(torch.tensor([3.0]), torch.tensor([2.0]), min_target=4.0)
    assert math.isnan(float(ape[0]))


def test_dilate_2d_square_and_zero():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 3, 3] = True
    assert dilate(m, 0).sum() == 1
    d = dilate(m, 1)
    assert d.sum() == 9 and d[0, 2:5, 2:5].all()
    assert dilate(m, 2).sum() == 25


def test_dilate_3d_cube_clipped_at_border():
    m = torch.zeros(2, 5, 5, 5, dtype=torch.bool)
    m[0, 2, 2, 2] = True
    m[1, 0, 0, 0] = True
    d = dilate(m, 1)
    assert d[0].sum() == 27
    assert d[1].sum() == 8  # corner voxel: the cube is clipped by the volume


def test_dilate_rejects_1d():
    with pytest.raises(ValueError):
        dilate(torch.zeros(2, 5, dtype=torch.bool), 1)


def test_masked_mean_abs_channel_axis_and_empty_mask():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 8.0]]]])
    assert masked_mean_abs(a, b).tolist() == pytest.approx([2.5, 2.0])
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [False, False]]])
    out = masked_mean_abs(a, b, mask)
    assert float(out[0]) == pytest.approx(2.5)
    assert math.isnan(float(out[1]))


def test_locality_inside_outside_on_known_images():
    x = torch.zeros(1, 1, 8, 8)
    x_cf = x.clone()
    x_cf[0, 0, 4, 4] = 1.0  # change inside the structure
    x_cf[0, 0, 0, 0] = 0.5  # change far outside
    s = torch.zeros(1, 8, 8, dtype=torch.bool)
    s[0, 4, 4] = True
    loc = locality(x, x_cf, s, dilation=1)
    assert float(loc["inside"]) == pytest.approx(1.0 / 9.0)
    assert float(loc["outside"]) == pytest.approx(0.5 / (64 - 9))


def test_to_255_scale():
    assert to_255(2.0) == pytest.approx(255.0)
    assert to_255(torch.tensor([0.02])).item() == pytest.approx(2.55)


def test_permutation_fixed_seed():
    p = permutation(10, 3)
    assert sorted(p.tolist()) == list(range(10))
    assert torch.equal(p, permutation(10, 3))
    assert not torch.equal(p, permutation(10, 4))


def test_bootstrap_mean_interval_contains_mean_and_drops_nan():
    rng = np.random.default_rng(0)
    v = rng.normal(5.0, 1.0, size=200)
    r = bootstrap_mean(np.append(v, np.nan), resamples=500, seed=1)
    assert r["n"] == 200
    assert r["mean"] == pytest.approx(v.mean())
    assert r["lo"] < r["mean"] < r["hi"]
    # the interval is about 2 * 1.96 * sigma / sqrt(n) wide
    assert r["hi"] - r["lo"] == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    assert bootstrap_mean(v, 500, 1) == bootstrap_mean(v, 500, 1)
    assert math.isnan(bootstrap_mean([math.nan], 10, 0)["mean"])
    assert bootstrap_mean([3.0], 10, 0) == {"mean": 3.0, "lo": 3.0, "hi": 3.0, "n": 1}


def test_bootstrap_ratio_of_means():
    num = np.array([1.0, 2.0, 3.0, math.nan])
    den = np.array([2.0, 4.0, 6.0, 1.0])
    r = bootstrap_ratio(num, den, resamples=200, seed=0)
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.5)
    assert r["lo"] == pytest.approx(0.5) and r["hi"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0, 2.0])


# -- evaluate() on a tiny exact phantom ----------------------------------------------------------


def test_evaluate_known_answers(tmp_path, toy_run):
    from segcft.evaluate import evaluate

    res = evaluate(toy_run, tmp_path, split="test", n=24)
    assert res["n"] == 24 and res["phantom"] is True
    blob = res["interventions"]["blob_area"]["modes"]
    # identity generator: nothing changes, so composition, reversibility, locality are zero
    ident = blob["identity"]
    assert ident["locality"]["outside"]["mean"] == 0.0
    assert ident["reversibility"]["mean"] == 0.0
    assert res["composition"]["identity"]["m10"]["mean"] == 0.0
    # ... and its effectiveness error is the gap between factual and intended areas
    ds = toy_run.dataset("test")
    items = [ds[i] for i in range(24)]
    pa = torch.stack([it["parents"] for it in items])
    phys = toy_run.info.denormalise(pa.double())
    from segcft.metrics import permutation as perm_fn

    j = toy_run.info.index("blob_area")
    target = phys[perm_fn(24, 0 + 7919 * (j + 1)), j]
    # areas are quantised to whole pixels (4 mm^2) by the renderer
    measured = torch.round(phys[:, j] / 4.0) * 4.0
    expected = (100 * (measured - target).abs() / target).mean().item()
    assert ident["effectiveness"]["eval"]["mape"]["mean"] == pytest.approx(expected, rel=1e-6)
    # oracle generator: exact counterfactuals, no leakage, no change outside the structure
    orc = blob["oracle"]
    assert orc["effectiveness"]["eval"]["mae"]["mean"] <= 2.0 + 1e-6
    assert orc["ground_truth"]["all"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # spot is untouched by both generators: its error is only the renderer's pixel rounding
    assert orc["leakage"]["mape_mean"]["eval"]["mean"] == pytest.approx(ident["leakage"]["mape_mean"]["eval"]["mean"])
    assert orc["leakage"]["per_variable"]["spot_area"]["eval"]["mae"]["mean"] <= 2.0 + 1e-6
    assert orc["locality"]["outside"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert orc["locality"]["inside"]["mean"] > 1.0
    assert orc["reversibility"]["mean"] == pytest.approx(0.0, abs=1e-9)
    lo, hi = ident["effectiveness"]["eval"]["mape"]["lo"], ident["effectiveness"]["eval"]["mape"]["hi"]
    assert lo < expected < hi
    # do(age): blob_area is a descendant and follows; the identity generator misses it
    age = res["interventions"]["age"]
    assert age["descendants"] == ["blob_area"]
    assert age["modes"]["oracle"]["leakage"]["per_variable"]["blob_area"]["eval"]["mae"]["mean"] <= 2.0 + 1e-6
    assert age["modes"]["identity"]["leakage"]["per_variable"]["blob_area"]["eval"]["mae"]["mean"] > 10.0
    # reference rows: the unchanged image scores what the identity generator scores, the exact
    # counterfactual what the oracle scores
    refs = res["interventions"]["blob_area"]["references"]
    assert set(refs) == {"unchanged", "exact"} and "references" in res["interventions"]["age"]
    for ref, gen in (("unchanged", ident), ("exact", orc)):
        for who in ("eval", "guide"):
            assert refs[ref]["effectiveness"][who]["mape"] == gen["effectiveness"][who]["mape"]
            assert refs[ref]["leakage"]["mape_mean"][who] == gen["leakage"]["mape_mean"][who]
            assert refs[ref]["leakage"]["per_variable"] == {
                s: {w: gen["leakage"]["per_variable"][s][w] for w in ("eval", "guide")} for s in ("spot_area",)
            }
    assert res["interventions"]["age"]["references"] == {}
    # files
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["interventions"]["blob_area"]["modes"]["oracle"]["ground_truth"]["all"]["mean"] == pytest.approx(0.0, abs=1e-9)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Evaluation: toy")
    assert "## Headline" in report and "### do(blob_area)" not in report and "## do(blob_area)" in report
    assert "| (unchanged) |" in report and "| (exact) |" in report and "Reference rows:" in report
    leak_table = report[report.index("Leakage: MAPE", report.index("## do(blob_area)")):]
    spot_exact = refs["exact"]["leakage"]["per_variable"]["spot_area"]["eval"]["mape"]
    assert f"| (exact) | {spot_exact['mean']:.2f} [" in leak_table.split("\n\n")[1]
    assert (tmp_path / "figures" / "cf_blob_area.png").stat().st_size > 1000


def test_evaluate_is_deterministic(tmp_path, toy_run):
    from segcft.evaluate import evaluate

    a = evaluate(toy_run, tmp_path / "a", n=8, figures=False)
    b = evaluate(toy_run, tmp_path / "b", n=8, figures=False)
    assert a == b


def test_evaluate_particles_average_the_same_counterfactuals(tmp_path, toy_run):
    """Deterministic generators: several particles give exactly the single-particle metrics."""
    from dataclasses import replace

    from segcft.evaluate import evaluate

    one = evaluate(toy_run, tmp_path / "one", n=8, figures=False)
    cfg = replace(toy_run.config, evaluate=replace(toy_run.config.evaluate, particles=3))
    three = evaluate(replace(toy_run, config=cfg), tmp_path / "three", n=8, figures=False)
    assert three["particles"] == 3
    flat_one, flat_three = _flatten(one), _flatten(three)
    assert flat_one.keys() == flat_three.keys()
    for key, v in flat_one.items():
        # the identity's outside/inside ratio is 0/0 with one particle and a ratio of rounding
        # errors of the particle mean with three
        if key != "particles" and "/ratio/" not in key:
            assert flat_three[key] == (pytest.approx(v, abs=1e-4, nan_ok=True) if isinstance(v, float) else v), key


def test_composition_to_ten_cycles_on_the_first_subjects_only(tmp_path, toy_run):
    """evaluate.composition_n bounds the subjects followed to m = 10 (nine more abductions and
    decodes each); m = 1 and every other metric are measured on all subjects, unchanged."""
    from dataclasses import replace

    from segcft.evaluate import evaluate

    def with_n(k):
        cfg = replace(toy_run.config, evaluate=replace(toy_run.config.evaluate, composition_n=k))
        return evaluate(replace(toy_run, config=cfg), tmp_path / f"c{k}", n=12, figures=False)

    every, first5, none = with_n(12), with_n(5), with_n(0)
    for res, n10 in ((every, 12), (first5, 5)):
        for mode in res["modes"]:
            assert res["composition"][mode]["m1"]["n"] == 12
            assert res["composition"][mode]["m10"]["n"] == n10
    assert all(none["composition"][m]["m10"] is None for m in none["modes"])
    flat = {k: v for k, v in _flatten(every).items() if not k.startswith("composition/")}
    for other in (first5, none):
        assert {k: v for k, v in _flatten(other).items() if not k.startswith("composition/")} == flat
    assert "m=10 on the first 5 subjects" in (tmp_path / "c5" / "report.md").read_text()
    assert "m=10 on the first" not in (tmp_path / "c12" / "report.md").read_text()
    assert "m=10 not measured" in (tmp_path / "c0" / "report.md").read_text()
    lines = (tmp_path / "c0" / "report.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| identity |"))  # the composition table's
    assert row.split("|")[3].strip() == "–"


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def test_shared_abduction_reproduces_the_hvae_counterfactual():
    """Evaluation abducts once and decodes per intervention; with the same draws this is the
    generator's own counterfactual (one abduction, decode under pa and pa_cf)."""
    from segcft.dscm import Abduction as _Abduction
    from segcft.models.configs import HVAEConfig
    from segcft.models.hvae import HVAE

    cfg = HVAEConfig(widths=(8, 16, 16), enc_blocks=(1, 1, 1), dec_blocks=(1, 1, 1), pool=(2, 4), z_max_res=8, z_dim=4)
    torch.manual_seed(0)
    gen = HVAE(cfg, (16, 16), 3).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    pa, pa_cf = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    with torch.inference_mode():
        for particles in (1, 2):
            torch.manual_seed(5)
            ref, _ = gen.counterfactual(x, pa, pa_cf, particles=particles)
            torch.manual_seed(5)
            ab = _Abduction(gen, x, pa, particles)
            torch.testing.assert_close(ab.under(pa_cf), ref, rtol=0, atol=1e-5)
            assert (ab.null() - x).abs().max() < 1e-5  # a null intervention returns x
            assert (ab.under(pa_cf) - x).abs().max() > 1e-3  # ... and a real one does not


def test_evaluate_rejects_bad_n(tmp_path, toy_run):
    from segcft.errors import UserError
    from segcft.evaluate import evaluate

    with pytest.raises(UserError, match="--n"):
        evaluate(toy_run, tmp_path, n=0)


def test_report_regions_get_their_own_sections():
    from segcft.evaluate import write_report

    ci = {"mean": 1.0, "lo": 0.5, "hi": 1.5, "n": 3}
    entry = {
        "effectiveness": {"eval": {"mae": ci, "mape": ci}},
        "leakage": {"mape_mean": {"eval": ci}, "per_variable": {}},
        "locality": {"outside": ci, "inside": ci, "ratio": ci, "outside_region": ci},
        "reversibility": ci,
    }
    res = {
        "dataset": "d", "split": "test", "n": 3, "modes": ["none", "pos-seg"], "bootstrap": 10, "seed": 0,
        "eval_segmentor": "separate", "dilation": 2, "phantom": False, "units": {"p_prox": "mm^3"},
        "factual": {}, "composition": {"none": {}, "pos-seg": {}},
        "interventions": {
            "p_prox": {"type": "continuous", "unit": "mm^3", "structure": True, "region": "proximal",
                       "descendants": [], "modes": {"none": entry, "pos-seg": entry}},
        },
    }
    text = write_report(res)
    assert "## Region: proximal" in text and "### do(p_prox) [mm^3]" in text
    assert "outside region" in text and "1.00 [0.50, 1.50]" in text
    # Volumes in 3D: from the structure variables' units, or the dataset's dimensionality when given.
    res["structures"] = ["p_prox"]
    assert "soft volumes in physical units (mm^3)" in write_report(res)
    assert "soft areas in physical units (mm^2)" in write_report(res, spatial_dims=2)


# -- figures -------------------------------------------------------------------------------------


def test_display_slice_follows_the_structure_in_3d():
    from segcft.figures import display_slice

    vol = np.zeros((6, 8, 5))
    focus = np.zeros((6, 8, 5), dtype=bool)
    focus[:, 6, 1:4] = True
    focus[2, 1, 2] = True
    assert display_slice(vol, focus) == 6
    assert display_slice(vol) == 4
    assert display_slice(np.zeros((4, 4))) is None


def test_counterfactual_grid_3d_and_training_curves(tmp_path):
    from segcft.figures import counterfactual_grid, plot_training_curves

    x = np.zeros((1, 6, 8, 5), dtype=np.float32)
    cf = x.copy()
    cf[0, 2:4, 6, 1:3] = 0.5
    mask = np.zeros((6, 8, 5), dtype=np.int64)
    mask[2:4, 6, 1:3] = 2
    out = counterfactual_grid(x, {"seg": cf, "none": x}, {"seg": mask}, tmp_path / "g.png", factual_mask=mask, focus=mask > 0)
    assert out.stat().st_size > 1000
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "stage,step,loss,nelbo,lambda\n"
        "generator,0,3.0,3.0,\n"
        "generator,50,2.0,2.0,\n"
        "cft-seg,0,1.0,,0.0\n"
        "cft-seg,10,0.5,,0.1\n"
    )
    paths = plot_training_curves(csv_path, tmp_path / "figs")
    assert [p.name for p in paths] == ["curves_generator.png", "curves_cft-seg.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # called again after every stage: only a stage with new rows is drawn again
    stamps = [p.stat().st_mtime_ns for p in paths]
    os.utime(paths[0], ns=(1, 1))
    os.utime(paths[1], ns=(1, 1))
    with open(csv_path, "a") as f:
        f.write("cft-seg,20,0.4,,0.2\n")
    assert plot_training_curves(csv_path, tmp_path / "figs") == paths
    assert paths[0].stat().st_mtime_ns == 1  # unchanged rows: kept
    assert paths[1].stat().st_mtime_ns != 1 and stamps[1] != 1  # new row: drawn again


def test_figures_draw_anisotropic_voxels_with_their_true_aspect(tmp_path, monkeypatch):
    import segcft.figures as figures

    figs = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, *a, **k: (figs.append(fig), save(fig, *a, **k))[1])
    x = np.zeros((1, 6, 8, 5), dtype=np.float32)
    cf = x.copy()
    cf[0, 2:4, 6, 1:3] = 0.5
    mask = np.zeros((6, 8, 5), dtype=np.int64)
    mask[2:4, 6, 1:3] = 2
    spacing = (2.0, 0.5, 0.25)  # mm along D, H, W: the shown (D, W) section has pixels 8 times taller than wide
    figures.counterfactual_grid(x, {"seg": cf}, {"seg": mask}, tmp_path / "g.png", focus=mask > 0, spacing=spacing)
    figures.counterfactual_png(x[0], cf[0], tmp_path / "p.png", focus=mask > 0, spacing=spacing)
    figures.counterfactual_png(x[0, 0], cf[0, 0], tmp_path / "q.png", spacing=(0.6, 0.2))
    image_axes = [[ax for ax in fig.axes if ax.images] for fig in figs]
    assert all(len(axes) >= 3 for axes in image_axes)
    assert all(ax.get_aspect() == pytest.approx(8.0) for axes in image_axes[:2] for ax in axes)
    assert all(ax.get_aspect() == pytest.approx(3.0) for ax in image_axes[2])
    assert figures.display_aspect((0.6, 0.2)) == pytest.approx(3.0) and figures.display_aspect(None) == "equal"


def test_figures_of_tall_sections_are_sized_to_their_panels(tmp_path):
    """A (D, W) section of a ccta-like volume is 3.75 times taller than wide: the figure must be
    sized to it, not leave most of its width blank (it left 65 % of the grid's columns white)."""
    import matplotlib.image as mpimg

    from segcft import figures

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 64, 32, 32)).astype(np.float32)
    mask = np.zeros((64, 32, 32), dtype=np.int64)
    mask[10:30, 16, 10:20] = 1
    spacing = (0.75, 0.4, 0.4)
    grid = figures.counterfactual_grid(x, {"a": x + 0.01, "b": x}, {"a": mask}, tmp_path / "g.png", spacing=spacing)
    single = figures.counterfactual_png(x[0], x[0] + 0.01, tmp_path / "p.png", masks=[mask], spacing=spacing)
    for path in (grid, single):
        white = (mpimg.imread(path)[..., :3] > 0.99).all(-1)
        assert white.all(axis=0).mean() < 0.3, path.name  # blank columns
        assert white.all(axis=1).mean() < 0.3, path.name  # blank rows
    assert figures.panel_size(np.zeros((64, 64)), "equal", 2.0) == (2.0, 2.0)
    w, h = figures.panel_size(np.zeros((64, 32)), 1.875, 2.0)
    assert h / w == pytest.approx(3.75) and w * h == pytest.approx(4.0)
