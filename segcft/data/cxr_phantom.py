"""cxr-phantom: 2D frontal chest-radiograph-like images whose counterfactuals are exact.

Data-generating process (every draw is counter-based from ``(seed, split, index)``):

Exogenous (the ``exogenous`` vector, everything the renderer needs besides the parents):
  width     ~ N(1, 0.04)                           thorax aspect (width / height)
  offsets   ~ N(0, 1) * (4..6 mm)                  lung and heart centre jitter, heart tilt
  shape, texture, noise, rib seeds ~ U(0, 1)       shape harmonics, textures, pixel noise
Parents (physical values, the variable order below):
  sex              ~ Bernoulli(0.5)                (1 = male)
  age              ~ N(52, 16) clipped to [18, 90] (years)
  body_size        ~ N(1, 0.06) clipped to [0.82, 1.18]   thorax scale relative to the average
  right_lung_area  = 17500 body^2 (1 + 0.12 sex) (1 - 0.0035 (age - 50)) exp(0.06 e_r)  (mm^2)
  left_lung_area   = 15400 body^2 (1 + 0.12 sex) (1 - 0.0035 (age - 50)) exp(0.06 e_l)
  heart_area       = 10500 body^2 (1 + 0.08 sex) (1 + 0.0040 (age - 50)) exp(0.10 e_h)
with e_* ~ N(0, 1). The shared body size makes the lung areas correlate strongly (r ~ 0.9).
DAG: sex, age and body_size -> each area; all of them -> the image. Global brightness and
contrast depend on age and body size, and body size also sets the thorax outline, so a
regressor can predict the areas from global cues: the shortcut that makes regressor-guided
fine-tuning change the whole image.

Body size is a parent, not hidden noise, so the declared graph is causally sufficient: it is a
common cause of the lung and heart areas and of the image. Hidden, it would break the image
mechanism's assumption that its exogenous noise is independent of its parents; every
generator would then learn "larger lungs come with a brighter, larger thorax", and the exact
counterfactual (which holds body size fixed) would be unreachable for any fine-tuning mode.

Geometry: each structure is a star-shaped region ``{x : |x - c| / R(theta) < s}`` with a
per-subject profile R; the scale s is picked by rank so the mask has exactly
``round(area / pixel_area)`` pixels. The lungs stay out of a per-subject mediastinal zone (the
heart outline at 17000 body^2 mm^2) and medial bands around the spine, so they never overlap
the heart while the heart area stays below that bound (beyond it the heart, in front,
occludes the lungs). Everything outside a structure's mask is independent of its variable:
changing one area changes pixels only inside that structure's old or new extent.

Field of view 352 mm: 5.5 mm per pixel at 64 x 64, scaled at other sizes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from segcft.data._common import (
    PhantomDataset,
    check_ranges,
    check_split,
    exact_size_mask,
    hashed_uniform,
    normals,
    pixel_noise,
    seed_ints,
    smooth_field,
    uniforms,
)
from segcft.data.configs import CXRPhantomConfig
from segcft.data.variables import DatasetInfo, Measure, Variable, fit_normalisation

NAME = "cxr-phantom"
FOV_MM = 352.0
STRUCTURES = {1: "right_lung", 2: "left_lung", 3: "heart"}
VARIABLES = [
    Variable("sex", "binary", (), ""),
    Variable("age", "continuous", (), "years"),
    Variable("body_size", "continuous", (), ""),
    Variable("right_lung_area", "continuous", ("sex", "age", "body_size"), "mm^2", Measure("right_lung")),
    Variable("left_lung_area", "continuous", ("sex", "age", "body_size"), "mm^2", Measure("left_lung")),
    Variable("heart_area", "continuous", ("sex", "age", "body_size"), "mm^2", Measure("heart")),
]
EXOGENOUS = (
    "width",
    "rl_dx",
    "rl_dy",
    "ll_dx",
    "ll_dy",
    "heart_dx",
    "heart_dy",
    "heart_tilt",
    "shape_seed",
    "texture_seed",
    "noise_seed",
    "rib_seed",
)
HEART_ZONE_AREA = 17000.0  # mm^2 at body = 1: the mediastinal zone the lungs keep out of
_STREAMS = 19


def _validate(config: CXRPhantomConfig) -> None:
    check_ranges("cxr-phantom", config, {"size": (16, 256)})


def sample_subjects(seed: int, split: int, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exogenous (N, 12) and physical parents (N, 6), both float32, of samples ``index``."""
    u = uniforms(seed, split, index, _STREAMS)
    z = normals(u)
    body = np.clip(1.0 + 0.06 * z[:, 0], 0.82, 1.18)
    width = 1.0 + 0.04 * np.clip(z[:, 1], -3, 3)
    offsets = np.clip(z[:, 2:9], -3, 3) * np.array([5, 6, 5, 6, 4, 5, 1], dtype=np.float64)
    seeds = u[:, 9:13]
    sex = (u[:, 13] < 0.5).astype(np.float64)
    age = np.clip(52.0 + 16.0 * z[:, 14], 18.0, 90.0)
    e = z[:, 16:19]
    common = body**2 * (1 + 0.12 * sex) * (1 - 0.0035 * (age - 50))
    right = 17500.0 * common * np.exp(0.06 * e[:, 0])
    left = 15400.0 * common * np.exp(0.06 * e[:, 1])
    heart = 10500.0 * body**2 * (1 + 0.08 * sex) * (1 + 0.004 * (age - 50)) * np.exp(0.10 * e[:, 2])
    exo = np.concatenate([width[:, None], offsets, seeds], axis=1)
    pa = np.stack([sex, age, body, right, left, heart], axis=1)
    return torch.from_numpy(exo).float(), torch.from_numpy(pa).float()


def _star_field(
    x: torch.Tensor,
    y: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    power: tuple[float, float],
    harmonics: torch.Tensor,
    tilt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised radius |d| / R(theta) of a star shape with per-quadrant semi-axes
    (left, right, up, down), superellipse powers (upper, lower half) and Fourier harmonics
    (B, 2, M) (amplitude, phase) of order 2..M+1."""
    dx = x - cx.view(-1, 1, 1)
    dy = y - cy.view(-1, 1, 1)
    if tilt is not None:
        c, s = torch.cos(tilt).view(-1, 1, 1), torch.sin(tilt).view(-1, 1, 1)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    r = torch.sqrt(dx * dx + dy * dy) + 1e-6
    cos_t, sin_t = dx / r, dy / r
    left, right, up, down = (a.view(-1, 1, 1) for a in axes)
    ax = torch.where(dx < 0, left, right)
    ay = torch.where(dy < 0, up, down)
    p = torch.where(dy < 0, torch.full_like(dy, power[0]), torch.full_like(dy, power[1]))
    base = ((cos_t.abs() / ax) ** p + (sin_t.abs() / ay) ** p) ** (-1.0 / p)
    theta = torch.atan2(dy, dx)
    mod = torch.ones_like(theta)
    for m in range(harmonics.shape[2]):
        amp = harmonics[:, 0, m].view(-1, 1, 1)
        phase = harmonics[:, 1, m].view(-1, 1, 1)
        mod = mod + amp * torch.cos((m + 2) * theta + phase)
    return r / (base * mod)


class _Anatomy(NamedTuple):
    """The star fields (B, H*W) of heart and lungs and the voxel sets (B, H*W) bool they select."""

    heart_f: torch.Tensor
    zone: torch.Tensor
    heart: torch.Tensor
    rl_f: torch.Tensor
    ll_f: torch.Tensor
    right: torch.Tensor
    left: torch.Tensor


def _anatomy(
    x: torch.Tensor,
    y: torch.Tensor,
    off: torch.Tensor,
    bx: torch.Tensor,
    body: torch.Tensor,
    pa: torch.Tensor,
    harm: torch.Tensor,
    px_area: float,
) -> _Anatomy:
    """Heart, the mediastinal zone the lungs keep out of, and both lungs, each of the exact
    area of its parent (in pixels of ``px_area`` mm^2)."""
    b, size = x.shape[0], x.shape[1]
    n_pix = size * size
    heart_f = _star_field(
        x,
        y,
        28.0 * bx + off[:, 4],
        40.0 * body + off[:, 5],
        (60.0 * bx, 66.0 * bx, 48.0 * body, 52.0 * body),
        (2.2, 2.0),
        harm[:, :, :, 2],
        tilt=-0.35 + 0.1 * off[:, 6],
    ).reshape(b, n_pix)
    zone = exact_size_mask(heart_f, torch.round(HEART_ZONE_AREA * body**2 / px_area))
    heart = exact_size_mask(heart_f, torch.round(pa[:, 5] / px_area))

    spine_band = (x.abs() < 26.0 * bx.view(-1, 1, 1)).reshape(b, n_pix)
    keep_out = zone | spine_band
    inf = torch.tensor(float("inf"))
    rl_f = _star_field(
        x,
        y,
        -72.0 * bx + off[:, 0],
        -22.0 * body + off[:, 1],
        (62.0 * bx, 44.0 * bx, 100.0 * body, 72.0 * body),
        (1.7, 3.2),
        harm[:, :, :, 0],
    ).reshape(b, n_pix)
    rl_f = torch.where(keep_out | (x.reshape(b, n_pix) > 0), inf, rl_f)
    ll_f = _star_field(
        x,
        y,
        70.0 * bx + off[:, 2],
        -18.0 * body + off[:, 3],
        (42.0 * bx, 60.0 * bx, 98.0 * body, 74.0 * body),
        (1.7, 3.2),
        harm[:, :, :, 1],
    ).reshape(b, n_pix)
    ll_f = torch.where(keep_out | (x.reshape(b, n_pix) < 0), inf, ll_f)
    right = exact_size_mask(rl_f, torch.round(pa[:, 3] / px_area))
    left = exact_size_mask(ll_f, torch.round(pa[:, 4] / px_area))
    return _Anatomy(heart_f, zone, heart, rl_f, ll_f, right, left)


def _interior(field: torch.Tensor, sel: torch.Tensor, size: int) -> torch.Tensor:
    """0 at the boundary, towards 1 deep inside (relative depth; zero outside the mask)."""
    scale = torch.where(sel, field, torch.zeros_like(field)).amax(1, keepdim=True).clamp(min=1e-6)
    depth = torch.clamp(1.0 - field / scale, 0.0, 1.0)
    return torch.where(sel, 1.0 - torch.exp(-depth * 5.0), torch.zeros_like(depth)).view(-1, size, size)


def _attenuation(
    x: torch.Tensor,
    y: torch.Tensor,
    bx: torch.Tensor,
    body: torch.Tensor,
    an: _Anatomy,
    rib_seed: torch.Tensor,
    tex_seed: torch.Tensor,
) -> torch.Tensor:
    """Attenuation (B, H, W): body soft tissue, spine, ribs, mediastinum, heart, lungs, textures."""
    b, size = x.shape[0], x.shape[1]
    tx = x / (150.0 * bx.view(-1, 1, 1))
    ty = (y - 30.0) / (195.0 * body.view(-1, 1, 1))
    body_r = (tx.abs() ** 2.6 + ty.abs() ** 2.6) ** (1 / 2.6)
    tissue = torch.clamp((1.0 - body_r) / 0.12, 0.0, 1.0) ** 0.7
    spine_w = 19.0 * bx.view(-1, 1, 1)
    vert = 0.75 + 0.25 * torch.cos(2 * math.pi * y / (27.0 * body.view(-1, 1, 1)))
    spine = torch.clamp(1.0 - (x.abs() / spine_w) ** 4, 0.0, 1.0) * vert
    rib_phase = hashed_uniform(rib_seed, 1).view(-1, 1, 1)
    lat = x.abs() / (150.0 * bx.view(-1, 1, 1))
    curve = y + 95.0 * body.view(-1, 1, 1) * (0.55 * lat - 0.9 * lat**2) - 38.0 * lat
    ribs = torch.relu(torch.cos(2 * math.pi * (curve / (26.0 * body.view(-1, 1, 1)) + rib_phase))) ** 3
    ribs = ribs * (y < 95.0 * body.view(-1, 1, 1)) * (x.abs() > 14.0) * tissue
    medi = (an.zone.view(b, size, size) & ~an.heart.view(b, size, size)).float()
    upper_medi = torch.clamp(1.0 - (x.abs() / (34.0 * bx.view(-1, 1, 1))) ** 6, 0.0, 1.0)

    lung_sel = an.right | an.left
    lung_depth = _interior(an.rl_f, an.right, size) + _interior(an.ll_f, an.left, size)
    heart_depth = _interior(an.heart_f, an.heart, size)
    tex = smooth_field(tex_seed, (size, size), (6, 12), salt=1)
    lung_tex = smooth_field(tex_seed, (size, size), (20, 32), salt=2)

    att = (
        0.40 * tissue
        + 0.08 * tissue * tex
        + 0.22 * spine
        + 0.10 * ribs
        + 0.16 * torch.maximum(medi, upper_medi * tissue)
    )
    lungs = lung_sel.view(b, size, size)
    att = torch.where(lungs, att - 0.20 - 0.10 * lung_depth + 0.04 * lung_tex, att)
    hearts = an.heart.view(b, size, size)
    return torch.where(hearts, att + 0.20 + 0.05 * heart_depth, att)


def render(exogenous: torch.Tensor, parents: torch.Tensor, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Draw subjects: (B, 12) exogenous, (B, 6) physical parents -> image (B, 1, size, size) in
    [-1, 1], mask (B, size, size) int64, no regions. Deterministic and batched."""
    exo = exogenous.float()
    pa = parents.float()
    b = exo.shape[0]
    spacing = FOV_MM / size
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * spacing - FOV_MM / 2
    y = coords.view(1, size, 1).expand(b, size, size)
    x = coords.view(1, 1, size).expand(b, size, size)
    width = exo[:, 0]
    off = exo[:, 1:8]
    shape_seed, tex_seed, noise_seed, rib_seed = (seed_ints(exo[:, 8 + k]) for k in range(4))
    sex, age, body = pa[:, 0], pa[:, 1], pa[:, 2]
    h = hashed_uniform(shape_seed, 18)
    harm = torch.stack([0.035 * h[:, 0:9] * 2 - 0.035, h[:, 9:18] * 2 * math.pi], 1).view(b, 2, 3, 3)
    bx = body * width  # lateral scale
    an = _anatomy(x, y, off, bx, body, pa, harm, spacing * spacing)

    mask = torch.zeros(b, size * size, dtype=torch.int64)
    mask[an.right] = 1
    mask[an.left] = 2
    mask[an.heart] = 3  # in front: occludes the lungs only when it outgrows the mediastinal zone
    mask = mask.view(b, size, size)

    att = _attenuation(x, y, bx, body, an, rib_seed, tex_seed)
    bright = 0.35 * (body - 1.0) / 0.06 * 0.12 - 0.005 * (age - 50.0) + 0.03 * sex
    contrast = 1.0 + 0.35 * (body - 1.0) - 0.004 * (age - 50.0)
    img = -1.0 + 2.0 * contrast.view(-1, 1, 1) * att + bright.view(-1, 1, 1)
    img = img + 0.025 * pixel_noise(noise_seed, (size, size))
    return img.clamp(-1.0, 1.0).unsqueeze(1), mask, None


@functools.lru_cache(maxsize=8)
def _info(seed: int, size: int, train_size: int) -> DatasetInfo:
    _, pa = sample_subjects(seed, 0, np.arange(train_size))
    spacing = FOV_MM / size
    return DatasetInfo(
        name=NAME,
        spatial_dims=2,
        shape=(size, size),
        spacing=(spacing, spacing),
        structures=dict(STRUCTURES),
        variables=list(VARIABLES),
        normalisation=fit_normalisation(VARIABLES, pa.double().tolist()),
    )


def dataset_info(config: CXRPhantomConfig | None = None) -> DatasetInfo:
    """Metadata of the phantom, normalisation fitted on the training split."""
    config = config or CXRPhantomConfig()
    _validate(config)
    return _info(config.seed, config.size, config.train_size)


def build(config: CXRPhantomConfig | None, split: str) -> PhantomDataset:
    """The ``split`` (train, val, test) of the phantom as a map-style Dataset with ``render``."""
    config = config or CXRPhantomConfig()
    check_split(split)
    info = dataset_info(config)
    seed, size = config.seed, config.size
    return PhantomDataset(
        info,
        split,
        getattr(config, f"{split}_size"),
        functools.partial(sample_subjects, seed),
        functools.partial(render, size=size),
    )
