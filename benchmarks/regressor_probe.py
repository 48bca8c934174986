"""Does the regressor see the structures? Trains the regressor stage alone (quick preset,
cxr-phantom) for each seed and measures, on validation subjects (``--split``; settings are chosen
on val, never on test):

- corr: the correlation of the predicted and true (normalised) value of every variable;
- slope: for every structure variable, the least-squares slope of the predicted change against
  the true change (normalised units) between each subject's image and its exact counterfactual
  (the phantom re-rendered with the same exogenous noise and a permuted area). 1 means the
  regressor's area follows the structure, 0 that it reads only global cues;
- bright: for every structure variable, the mean change of its predicted value (normalised
  units) when every pixel of the image is raised by 0.1 (13/255), nothing else changed: how far
  Reg-CFT can move an area by brightening the whole image. 0 means the head ignores brightness.

The regressor is asked for each variable given the image and the other parents as the frozen
guide of Reg-CFT is (the counterfactual parents). Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/regressor_probe.py --seeds 0 1 2 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import tempfile
import time
from pathlib import Path

import torch

from segcft.checkpoint import load_checkpoint, load_model_state
from segcft.components import build_component, build_dataset
from segcft.config import load_run_config
from segcft.data.variables import DatasetInfo
from segcft.train.pipeline import run_training


def predict(reg: torch.nn.Module, x: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
    """Point estimates (B, P), conditioned on ``pa`` when the regressor takes parents."""
    takes_parents = len(inspect.signature(reg.forward).parameters) > 1
    with torch.no_grad():
        loc = (reg(x, pa) if takes_parents else reg(x))["loc"].float()
    return loc


def slope(dx: torch.Tensor, dy: torch.Tensor) -> float:
    """Least-squares slope of dy on dx (through the origin: both are changes)."""
    return float((dx * dy).sum() / (dx * dx).sum().clamp(min=1e-12))


def probe(reg: torch.nn.Module, dataset: object, info: DatasetInfo, n: int, seed: int) -> dict[str, float]:
    """corr per variable and exact-counterfactual slope per structure variable on ``n`` subjects."""
    exo, phys = dataset.subjects(range(n))  # type: ignore[attr-defined]
    image, _, _ = dataset.render(exo, phys)  # type: ignore[attr-defined]
    pa = info.normalise(phys.double()).float()
    pred = predict(reg, image, pa)
    out: dict[str, float] = {}
    for j, v in enumerate(info.variables):
        if v.type == "continuous":
            out[f"corr:{v.name}"] = float(torch.corrcoef(torch.stack([pred[:, j], pa[:, j]]))[0, 1])
    g = torch.Generator().manual_seed(seed)
    for v in info.structure_variables:
        j = info.index(v.name)
        perm = torch.randperm(n, generator=g)
        phys_cf = phys.clone()
        phys_cf[:, j] = phys[perm, j]
        image_cf, _, _ = dataset.render(exo, phys_cf)  # type: ignore[attr-defined]
        pa_cf = info.normalise(phys_cf.double()).float()
        pred_cf = predict(reg, image_cf, pa_cf)
        out[f"slope:{v.name}"] = slope(pa_cf[:, j] - pa[:, j], pred_cf[:, j] - pred[:, j])
    brighter = predict(reg, (image + 0.1).clamp(-1.0, 1.0), pa)
    for v in info.structure_variables:
        j = info.index(v.name)
        out[f"bright:{v.name}"] = float((brighter[:, j] - pred[:, j]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=256, help="subjects probed")
    ap.add_argument("--split", choices=("val", "test"), default="val", help="split probed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--keep", type=Path, help="copy each seed's regressor checkpoint to KEEP/regressor-seedS.pt")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        cfg = load_run_config(preset="quick", overrides=[f"seed={seed}", *args.overrides])
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            t0 = time.perf_counter()
            run_training(cfg, run_dir, only=["regressor"])
            seconds = time.perf_counter() - t0
            probed = build_dataset(cfg, args.split)
            info = probed.info
            reg = build_component("regressor", cfg.regressor, info)
            path = run_dir / "checkpoints" / "regressor.pt"
            load_model_state(reg, load_checkpoint(path), path, "regressor")
            reg.eval()
            res = probe(reg, probed, info, args.n, seed)
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, args.keep / f"regressor-seed{seed}.pt")
        res["seconds"] = seconds
        rows.append(res)
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    keys = list(rows[0])
    print("\nmedian over seeds:")
    for k in keys:
        vals = sorted(r[k] for r in rows)
        print(f"  {k:28s} {vals[len(vals) // 2]:8.3f}   (min {vals[0]:.3f}, max {vals[-1]:.3f})")


if __name__ == "__main__":
    main()
