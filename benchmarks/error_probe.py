"""Where does a counterfactual's error against the exact counterfactual come from? (phantoms)

Evaluates a finished run as ``segcft evaluate`` does and, for every structure intervention and
mode, splits the image into four regions by the factual mask (F) and the exact counterfactual's
mask (T):

- moved: F xor T, the pixels whose label the intervention changes;
- interior: F and T, the part of the structure both images share;
- ring: the evaluation's dilation of F or T, minus F or T;
- outside: the rest (the evaluation's "outside structure").

Per region it prints the error |x_cf - exact|, the change |x_cf - x| and the exact
counterfactual's own change |exact - x| (0-255), and the region's share of the image, so that
share x error adds up to the evaluation's "error vs exact cf". It also prints the edge sharpness
(mean Sobel magnitude within one pixel of the exact boundary, and inside the interior) of x_cf
and of the exact counterfactual: a blurred edit shows as a lower edge sharpness than the exact one.

    python benchmarks/error_probe.py RUN_COPY [--split test] [--out probe.json]

It rewrites RUN_COPY's metrics.json, report.md and figures (as ``segcft evaluate`` does): run it
on a copy of the run folder. Choose settings on ``--split val``.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from segcft.evaluation import loop
from segcft.metrics import dilate

_stats: dict[tuple[str, str], dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))


def _sobel(x: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device).view(1, 1, 3, 3) / 8
    gx = F.conv2d(x.float(), kx, padding=1)
    gy = F.conv2d(x.float(), kx.transpose(2, 3), padding=1)
    return (gx**2 + gy**2).sqrt()[:, 0]


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of (B, *S) ``values`` over ``mask``, on the 0-255 scale of images in [-1, 1]."""
    return float((values * mask).sum() / mask.sum().clamp_min(1) * 127.5)


def _record(scorer: object, iv: object, x_cf: torch.Tensor) -> None:
    x, exact = scorer.x, iv.true_image  # type: ignore[attr-defined]
    fact, true = iv.fact_mask, iv.true_mask  # type: ignore[attr-defined]
    union = fact | true
    d = scorer.ev.dilation  # type: ignore[attr-defined]
    regions = {
        "moved": fact ^ true,
        "interior": fact & true,
        "ring": dilate(union, d) & ~union,
        "outside": ~dilate(union, d),
    }
    row = _stats[(iv.var.name, scorer.mode)]  # type: ignore[attr-defined]
    for name, m in regions.items():
        row[f"err_{name}"].append(_mean((x_cf - exact).abs()[:, 0], m))
        row[f"change_{name}"].append(_mean((x_cf - x).abs()[:, 0], m))
        row[f"exact_change_{name}"].append(_mean((exact - x).abs()[:, 0], m))
        row[f"share_{name}"].append(float(m.float().mean()))
    edge = dilate(true, 1) ^ ~dilate(~true, 1)
    s_cf, s_exact = _sobel(x_cf), _sobel(exact)
    row["edge_sharpness_cf"].append(_mean(s_cf, edge))
    row["edge_sharpness_exact"].append(_mean(s_exact, edge))
    row["interior_sharpness_cf"].append(_mean(s_cf, regions["interior"]))
    row["interior_sharpness_exact"].append(_mean(s_exact, regions["interior"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a copy of a finished 2D phantom run folder")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    original = loop._ModeScorer._locality

    def locality(self: loop._ModeScorer, iv: loop._Intervention, x_cf: torch.Tensor, cf_labels: object) -> None:
        original(self, iv, x_cf, cf_labels)  # type: ignore[arg-type]
        if iv.fact_mask is not None and iv.true_image is not None and iv.true_mask is not None:
            _record(self, iv, x_cf)

    loop._ModeScorer._locality = locality  # type: ignore[method-assign]
    loop.evaluate_run(args.run, args.split)
    out = {f"{v}|{m}": {k: sum(xs) / len(xs) for k, xs in row.items()} for (v, m), row in _stats.items()}
    for key, row in out.items():
        print(key, " ".join(f"{k}={v:.3f}" if k.startswith("share") else f"{k}={v:.2f}" for k, v in row.items()))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
