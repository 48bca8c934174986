"""Does the pre-trained generator follow its structure parents? Slope of the guide-measured area
change against the intended area change (4 steps of -1..+1 std of the variable, descendants
following through the mechanisms), for prior-mean decodes (temperature 0), for abducted decodes
of 64 val images and for those decodes' mean alone (without the abducted pixel noise), per
structure. A slope of 1 is a generator that draws what it is told; 0 one that ignores the parent.
The run's evaluation reports the same check on the test split.

    OMP_NUM_THREADS=1 python benchmarks/responsiveness_probe.py RUN_DIR [MODE]
"""
import json
import sys

import torch

from segcft.evaluation.measure import Measurer
from segcft.run import load_run

run_dir, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "none")
n = 64
torch.manual_seed(0)
run = load_run(run_dir, device="cpu")
info = run.info
ds = run.dataset("val")
items = [ds[i] for i in range(n)]
x = torch.stack([torch.as_tensor(it["image"]) for it in items]).float()
pa = torch.stack([torch.as_tensor(it["parents"]) for it in items]).float()
dscm = run.dscm(mode)
seg = run.segmentor
meas = Measurer(info)
deltas = [-1.0, -0.5, 0.5, 1.0]
out = {}
with torch.no_grad():
    ab = dscm.abduct(x, pa)
    for var in info.structure_variables:
        j = info.index(var.name)
        res = {}
        for kind in ("prior", "abducted", "abducted_mean"):

            def decode(p, kind=kind):
                if kind == "abducted":
                    return ab.under(p)
                if kind == "abducted_mean":
                    return ab.under_with_mean(p)[1]
                torch.manual_seed(1)
                return dscm.generator.sample(p, temperature=0.0)

            base_pa = dscm.parents_counterfactual(pa, {var.name: pa[:, j]})
            a0 = meas(seg(decode(base_pa)), None)[:, j]
            t0 = info.denormalise(base_pa.double())[:, j]
            dm, dt = [], []
            for d in deltas:
                pcf = dscm.parents_counterfactual(pa, {var.name: pa[:, j] + d})
                a = meas(seg(decode(pcf)), None)[:, j]
                t = info.denormalise(pcf.double())[:, j]
                dm.append(a - a0)
                dt.append(t - t0)
            res[kind] = float((torch.cat(dm) * torch.cat(dt)).sum() / (torch.cat(dt) ** 2).sum())
        out[var.name] = res
print(json.dumps(out))
