"""The regressor's reading, calibrated on held-out data so that it follows each variable with
slope 1 (a regression-dilution correction; docs/method.md section 5.7).

A regressor trained by likelihood predicts E[v | x, pa_v]. Where its reading of v from the image
is noisy, that mean shrinks towards what v's parents alone predict, by a factor s (the
*attenuation*, 0 < s <= 1): on an exact counterfactual, where only v moves, the prediction moves by
about s times the true change. Reg-CFT, asked to bring the prediction to v*, then drives the image
past the counterfactual (by about 1/s of the change) or towards cues that are not the structure.
Held-out triples (image, parents, v) measure s without any counterfactual: it is the partial
least-squares slope of the prediction on v with v's causal parents held fixed,

    pred_v ~ s v + b . pa_v + c,

and the calibrated reading (pred_v - b . pa_v - c) / s follows v with slope about 1. The same fit
on the training split overstates s (the regressor has seen those images), so the regressor stage
fits it on the validation split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segcft.data.variables import DatasetInfo

__all__ = [
    "CALIBRATION_KEYS",
    "CALIBRATION_SAMPLES",
    "MIN_ATTENUATION",
    "CalibratedRegressor",
    "calibration_problem",
    "fit_calibration",
]

CALIBRATION_KEYS = ("attenuation", "weight", "bias", "fitted", "calibrated")
"""The tensors of a calibration, as the regressor stage's checkpoint stores them."""

CALIBRATION_SAMPLES = 512
"""Validation subjects the calibration is fitted on (the first ones, in order)."""

MIN_ATTENUATION = 0.2
"""Below this attenuation a variable is left uncalibrated: dividing by a smaller s would
multiply the reading's noise by more than 5, and a regressor that moves its prediction by a
fifth of the truth does not read the variable from the image."""

_BATCH = 64


@torch.no_grad()
def fit_calibration(
    regressor: nn.Module, dataset: Any, info: DatasetInfo, device: torch.device, samples: int = CALIBRATION_SAMPLES
) -> dict[str, torch.Tensor]:
    """Per continuous variable v: the attenuation s (``attenuation``), the parents' coefficients b
    (row v of ``weight``, zero outside v's causal parents) and the intercept c (``bias``) of the
    least-squares fit pred_v ~ s v + b . pa_v + c on the first ``samples`` subjects of
    ``dataset``, the regressor given the recorded parents; ``calibrated`` says which variables
    the reading divides (continuous, s >= MIN_ATTENUATION, v not fixed by its parents)."""
    n = min(len(dataset), samples)
    names = list(info.variable_names)
    num = len(names)
    out = {
        "attenuation": torch.ones(num),
        "weight": torch.zeros(num, num),
        "bias": torch.zeros(num),
        "fitted": torch.zeros(num, dtype=torch.bool),
        "calibrated": torch.zeros(num, dtype=torch.bool),
    }
    if n == 0:
        return out
    preds, truths = [], []
    was_training = regressor.training
    regressor.eval()
    for start in range(0, n, _BATCH):
        items = [dataset[i] for i in range(start, min(n, start + _BATCH))]
        x = torch.stack([it["image"] for it in items]).to(device)
        pa = torch.stack([it["parents"] for it in items]).float().to(device)
        preds.append(regressor(x, pa)["loc"].double().cpu())
        truths.append(pa.double().cpu())
    regressor.train(was_training)
    pred, true = torch.cat(preds), torch.cat(truths)
    for j, var in enumerate(info.variables):
        if var.type != "continuous":
            continue
        cols = [names.index(p) for p in var.parents]
        if n < len(cols) + 8:  # too few subjects for the fit
            continue
        others = torch.cat([true[:, cols], torch.ones(n, 1, dtype=torch.float64)], dim=1)
        # v's own variation with its parents held fixed; none left: nothing to fit
        resid = true[:, j] - others @ torch.linalg.lstsq(others, true[:, j : j + 1]).solution[:, 0]
        if float(resid.std()) < 1e-6 * max(float(true[:, j].std()), 1e-12):
            continue
        design = torch.cat([true[:, j : j + 1], others], dim=1)
        coef = torch.linalg.lstsq(design, pred[:, j : j + 1]).solution[:, 0]
        if not bool(torch.isfinite(coef).all()):
            continue
        out["attenuation"][j] = float(coef[0])
        out["weight"][j, cols] = coef[1:-1].float()
        out["bias"][j] = float(coef[-1])
        out["fitted"][j] = True
        out["calibrated"][j] = float(coef[0]) >= MIN_ATTENUATION
    return out


def calibration_problem(calibration: Any, num: int) -> str | None:
    """What is wrong with a stored calibration for ``num`` variables, or None when it fits."""
    if not isinstance(calibration, dict):
        return "it has no calibration"
    missing = [k for k in CALIBRATION_KEYS if not isinstance(calibration.get(k), torch.Tensor)]
    if missing:
        return f"its calibration lacks {', '.join(missing)}"
    shapes = {k: tuple(calibration[k].shape) for k in CALIBRATION_KEYS}
    expected = {k: (num, num) if k == "weight" else (num,) for k in CALIBRATION_KEYS}
    if shapes != expected:
        return f"its calibration has shapes {shapes}, expected {expected} for {num} variables"
    return None


class CalibratedRegressor(nn.Module):
    """A frozen regressor read through its calibration, as a fine-tuning guide reads it (forward
    only): ``loc`` (pred - b . pa_v - c) / s and ``scale`` / s for the calibrated variables,
    everything else as the regressor gives it. The parents are those the caller passes (Reg-CFT:
    the counterfactual ones), else the regressor's own point estimates."""

    attenuation: torch.Tensor  # (P,) s of every fitted variable, 1 elsewhere
    fitted: torch.Tensor  # (P,) bool
    calibrated: torch.Tensor  # (P,) bool: the variables whose reading is divided
    divisor: torch.Tensor  # (P,) s where calibrated, 1 elsewhere (never 0 or NaN in either branch)
    weight: torch.Tensor  # (P, P) b: row v holds the coefficients of v's parents
    bias: torch.Tensor  # (P,) c
    binary: torch.Tensor  # (P,) bool

    def __init__(self, regressor: nn.Module, calibration: dict[str, torch.Tensor], info: DatasetInfo) -> None:
        super().__init__()
        self.regressor = regressor
        self.spatial_dims = int(getattr(regressor, "spatial_dims", info.spatial_dims))
        self.variables = tuple(info.variable_names)
        cal = {k: torch.as_tensor(calibration[k]) for k in CALIBRATION_KEYS}
        calibrated = cal["calibrated"].bool()
        buffers = {
            "attenuation": cal["attenuation"].float(),
            "fitted": cal["fitted"].bool(),
            "calibrated": calibrated,
            "divisor": torch.where(calibrated, cal["attenuation"].float(), torch.ones(())),
            "weight": cal["weight"].float(),
            "bias": cal["bias"].float(),
            "binary": torch.tensor([v.type == "binary" for v in info.variables], dtype=torch.bool),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.clone(), persistent=False)

    def forward(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.regressor(x, parents)
        loc, scale = out["loc"].float(), out["scale"].float()
        given = parents if parents is not None else torch.where(self.binary, torch.sigmoid(loc), loc)
        read = (loc - given.float() @ self.weight.t() - self.bias) / self.divisor
        return {
            "loc": torch.where(self.calibrated, read, loc),
            "scale": torch.where(self.calibrated, scale / self.divisor, scale),
        }

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per fitted variable: its attenuation and whether the reading divides by it."""
        return {
            name: {"attenuation": float(self.attenuation[j]), "calibrated": bool(self.calibrated[j])}
            for j, name in enumerate(self.variables)
            if bool(self.fitted[j])
        }
