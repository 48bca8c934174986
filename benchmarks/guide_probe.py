"""Can the guide segmentor resolve plaque per region? Per-region plaque soft-volume MAPE of the exact
counterfactual and of the unchanged volume under do(plaque_<region>), on ccta-phantom.

Trains only the parent mechanisms and the guide segmentor (unless the run folder has them), then
measures on a split (default val: never tune on test):
- floor:     the segmentor on the factual volumes against their recorded plaque volumes;
- exact:     on the exact counterfactual the phantom renders from the same exogenous noise;
- unchanged: the factual volume left as it is, against the counterfactual value.
Then where the floor's error lives (temperature 0.5, factual volumes): the mean class probabilities
on calcified plaque voxels (above CALCIUM_HU) and on the other plaque voxels, the plaque
probability mass that falls in the lumen and in the background (wall, fat) as a share of the true
plaque volume, per plaque kind, and the correlation of the signed error with the wall thickness
(plaque and wall have nearly the same attenuation, so the plaque's outer edge must be inferred).
Interventions are drawn as in evaluation (the split's own values permuted with a fixed seed,
descendants through the mechanisms). Each measurement variant is one row: ``T=<t>`` divides the
logits by t before the soft volume (the segmentor's ``measure_temperature``), ``hard`` counts
argmax voxels (a reference only; it has no gradient). The row ``run`` is the run's own
measurement, exactly as evaluation and fine-tuning take it.

Run (one seed, quick 3D preset; --set values go to `segcft train`):
  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/guide_probe.py --run-dir /tmp/probe/base0 --seed 0
  OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/guide_probe.py --run-dir /tmp/probe/w0 --seed 0 \
      --set segmentor.class_weights=[1,1,10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component, build_dataset
from segcft.data.variables import read_dataset_info
from segcft.evaluation.measure import Measurer
from segcft.metrics import abs_errors, permutation
from segcft.models.mechanisms import ParentSCM
from segcft.run import RunDir


def train(run_dir: Path, seed: int, sets: list[str]) -> float:
    """Train mechanisms and the guide segmentor with the quick preset; wall seconds."""
    cmd = [sys.executable, "-m", "segcft", "train", "--dataset", "ccta-phantom", "--seed", str(seed)]
    cmd += ["--only", "mechanisms", "--only", "segmentor", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def load(run_dir: Path) -> tuple:
    """Config, dataset info, raw-logit guide segmentor (temperature 1) and mechanisms of a run."""
    rd = RunDir(run_dir)
    cfg = rd.read_config()
    info = read_dataset_info(rd.dataset_json)
    raw = dataclasses.replace(cfg.segmentor, params=dataclasses.replace(cfg.segmentor.params, measure_temperature=1.0))
    seg = build_component("segmentor", raw, info)
    load_model_state(seg, load_checkpoint(rd.final("segmentor")), rd.final("segmentor"), "segmentor")
    own = build_component("segmentor", cfg.segmentor, info)
    load_model_state(own, load_checkpoint(rd.final("segmentor")), rd.final("segmentor"), "segmentor")
    mech = ParentSCM(info, cfg.mechanisms)
    load_model_state(mech, load_checkpoint(rd.final("mechanisms")), rd.final("mechanisms"), "mechanisms")
    return cfg, info, seg.eval(), own.eval(), mech.eval()


CALCIUM_HU = 600.0
"""Plaque voxels brighter than this are calcified (750 HU; the contrast-filled lumen stays below 550)."""


def breakdown(
    probs: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, regions: torch.Tensor, exo: torch.Tensor
) -> dict:
    """Where the plaque soft-volume error of the factual volumes lives; ``probs`` (N, 3, ...)."""
    calcium = (mask == 2) & (image[:, 0] > (CALCIUM_HU - 250.0) / 500.0)
    voxels = {"calcified": calcium, "soft": (mask == 2) & ~calcium}
    out: dict = {
        f"{k} voxels": {c: float(probs[:, i][sel].mean()) for i, c in enumerate(("background", "lumen", "plaque"))}
        for k, sel in voxels.items()
    }
    pp = probs[:, 2]
    rows: dict[str, list[torch.Tensor]] = {"calcified": [], "true": [], "bg": [], "lumen": [], "missed": [], "err": []}
    for r in (1, 2, 3):
        inr = regions == r
        true = ((mask == 2) & inr).flatten(1).sum(1).float()
        rows["true"].append(true)
        rows["calcified"].append(exo[:, 10 + 5 * (r - 1)] > 0)
        rows["bg"].append((pp * ((mask == 0) & inr)).flatten(1).sum(1))
        rows["lumen"].append((pp * ((mask == 1) & inr)).flatten(1).sum(1))
        rows["missed"].append(((1 - pp) * ((mask == 2) & inr)).flatten(1).sum(1))
        rows["err"].append((pp * inr).flatten(1).sum(1) - true)
    o = {k: torch.cat(v) for k, v in rows.items()}
    share = {k: 100 * o[k] / o["true"] for k in ("bg", "lumen", "missed", "err")}
    for name, sel in (("calcified plaques", o["calcified"]), ("non-calcified plaques", ~o["calcified"])):
        out[name] = {"n": int(sel.sum()), "MAPE": float(share["err"][sel].abs().mean())}
        out[name] |= {f"% in {k}": float(share[k][sel].mean()) for k in ("bg", "lumen")}
        out[name]["% missed"] = float(share["missed"][sel].mean())
    wall = exo[:, 1].repeat(3)
    out["corr(signed error, wall thickness)"] = float(torch.corrcoef(torch.stack([share["err"], wall]))[0, 1])
    return out


@torch.inference_mode()
def measure(run_dir: Path, split: str, n: int, temperatures: list[float]) -> dict:
    """{variant: {source: {variable: (MAPE %, signed mean % error)}}} on the first n samples."""
    cfg, info, seg, own, mech = load(run_dir)
    ds = build_dataset(cfg, split)
    n = min(n, len(ds))
    items = [ds[i] for i in range(n)]
    data = {
        k: torch.stack([torch.as_tensor(it[k]) for it in items])
        for k in ("image", "mask", "regions", "parents", "exogenous")
    }
    meas = Measurer(info)
    plaque = [v for v in info.structure_variables if v.measure and v.measure.region]
    variants = [f"T={t:g}" for t in temperatures] + ["hard", "run"]

    probs = []

    def areas(x: torch.Tensor, regions: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(0, x.shape[0], 8):
            logits = seg(x[i : i + 8].float())
            if keep:
                probs.append(torch.softmax(logits / 0.5, 1))
            r = regions[i : i + 8].long()
            row = {f"T={t:g}": meas(logits / t, r) for t in temperatures}
            row["hard"] = meas(
                30.0 * torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1).float(), r
            )
            row["run"] = meas(own(x[i : i + 8].float()), r)
            for k, v in row.items():
                out.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in out.items()}

    pa = data["parents"].float()
    phys = info.denormalise(pa.double())
    fact = areas(data["image"], data["regions"], keep=True)
    res: dict = {v: {"floor": {}, "exact": {}, "unchanged": {}} for v in variants}
    res["where"] = breakdown(torch.cat(probs), data["image"], data["mask"], data["regions"], data["exogenous"])

    def score(variant: str, source: str, name: str, measured: torch.Tensor, target: torch.Tensor) -> None:
        _, ape = abs_errors(measured, target, info.voxel_size)
        signed = 100.0 * (measured - target) / target.abs().clamp_min(1e-300)
        ok = torch.isfinite(ape)
        res[variant][source][name] = (float(ape[ok].mean()), float(signed[ok].mean()))

    for var in plaque:
        j = info.index(var.name)
        targets = pa[permutation(n, int(cfg.seed) + 7919 * (j + 1)), j]
        pa_cf = mech.counterfactual(pa, {var.name: targets}).float()
        phys_cf = info.denormalise(pa_cf.double())
        image, _, _ = ds.render(data["exogenous"], phys_cf.float())
        exact = areas(image, data["regions"])
        for v in variants:
            score(v, "floor", var.name, fact[v][:, j], phys[:, j])
            score(v, "exact", var.name, exact[v][:, j], phys_cf[:, j])
            score(v, "unchanged", var.name, fact[v][:, j], phys_cf[:, j])
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="passed to segcft train --set")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--temperatures", default="1,0.5,0.25")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    wall = math.nan
    if not RunDir(args.run_dir).final("segmentor").is_file():
        wall = train(args.run_dir, args.seed, args.sets)
    res = measure(args.run_dir, args.split, args.n, [float(t) for t in args.temperatures.split(",")])
    print(f"{args.run_dir} (seed {args.seed}, {args.split}, train wall {wall:.0f} s)  MAPE % [signed mean %]")
    where = res.pop("where")
    for variant, sources in res.items():
        for source, per in sources.items():
            cells = "  ".join(f"{k.removeprefix('plaque_')} {m:6.1f} [{b:+6.1f}]" for k, (m, b) in per.items())
            print(f"  {variant:7s} {source:9s} {cells}")
    print("  where the floor's error lives (T=0.5; % of the true plaque volume):")
    for key, value in where.items():
        cells = "  ".join(f"{k} {v:.3g}" for k, v in value.items()) if isinstance(value, dict) else f"{value:+.2f}"
        print(f"    {key:22s} {cells}")
    out = args.run_dir / "guide_probe.json"
    res["where"] = where
    out.write_text(json.dumps({"seed": args.seed, "split": args.split, "train_wall_s": wall, "results": res}, indent=1))


if __name__ == "__main__":
    main()
