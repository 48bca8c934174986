"""ccta-phantom: 3D straightened coronary artery segments whose counterfactuals are exact.

A volume (D, H, W) = (64, 32, 32) by default, the vessel running along D, field of view
48 x 12.8 x 12.8 mm (0.75 x 0.4 x 0.4 mm voxels at the default size). Structures: 1 lumen,
2 plaque; regions: 1 proximal, 2 mid, 3 distal (thirds along D; id 0 is unused).

Data-generating process (every draw is counter-based from ``(seed, split, index)``):

Exogenous (the ``exogenous`` vector):
  vessel    ~ N(1, 0.08) clipped to [0.8, 1.2]     calibre of the healthy vessel
  wall      ~ U(0.2, 0.35)                         wall thickness / inner radius
  wiggle    amplitudes and phases of the centreline
  per region: plaque centre (fraction of the third), half-length (mm), angle, eccentricity,
            calcified fraction (0 for about 60% of plaques)
  myocardium direction and distance; texture and noise seeds ~ U(0, 1)
Parents (physical values, the variable order below):
  age              ~ N(60, 10) clipped to [30, 90] (years)
  sex              ~ Bernoulli(0.5)                (1 = male)
  contrast         = 380 - 3 (age - 60) + 35 e_c    (HU of the contrast-filled lumen)
  plaque_<region>  = 5 + 38 sigmoid(b_r - 1.5 + 0.08 (age - 60) + 0.5 sex + 0.9 e_r)  (mm^3)
                     with b_r = 0.5, 0, -0.4 for proximal, mid, distal
  lumen_volume     = V_healthy - (plaque_proximal + plaque_mid + plaque_distal)        (mm^3)
                     V_healthy = 262 vessel^2 (1 + 0.1 sex), the volume inside the wall
DAG: age -> contrast; age, sex -> each plaque volume; sex and the plaque volumes -> lumen_volume.
Contrast and plaque burden are confounded through age: a regressor can predict plaque from the
global brightness of the lumen (the shortcut).

Geometry: the volume inside the vessel wall holds exactly lumen_volume + sum(plaque) mm^3 (the
``round(volume / voxel)`` voxels with the smallest normalised radius); inside it, each region's
plaque is the ``round(plaque / voxel)`` voxels of that third that score lowest on an eccentric,
wall-hugging bump; the lumen is the rest. Intervening on one plaque volume (with lumen_volume
following its mechanism, i.e. the same V_healthy) changes voxels only in that third, inside the
old or new plaque; intervening on lumen_volume alone rescales the vessel.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from segcft.data._common import (
    PhantomDataset,
    check_ranges,
    check_split,
    exact_size_mask,
    normals,
    pixel_noise,
    seed_ints,
    smooth_field,
    uniforms,
)
from segcft.data.configs import CCTAPhantomConfig
from segcft.data.variables import DatasetInfo, Measure, Variable, fit_normalisation

NAME = "ccta-phantom"
FOV_MM = (48.0, 12.8, 12.8)
STRUCTURES = {1: "lumen", 2: "plaque"}
REGIONS = {1: "proximal", 2: "mid", 3: "distal"}
PLAQUES = ("plaque_proximal", "plaque_mid", "plaque_distal")
VARIABLES = [
    Variable("age", "continuous", (), "years"),
    Variable("sex", "binary", (), ""),
    Variable("contrast", "continuous", ("age",), "HU"),
    Variable("plaque_proximal", "continuous", ("age", "sex"), "mm^3", Measure("plaque", "proximal")),
    Variable("plaque_mid", "continuous", ("age", "sex"), "mm^3", Measure("plaque", "mid")),
    Variable("plaque_distal", "continuous", ("age", "sex"), "mm^3", Measure("plaque", "distal")),
    Variable("lumen_volume", "continuous", ("sex", *PLAQUES), "mm^3", Measure("lumen")),
]
EXOGENOUS = (
    "vessel",
    "wall",
    "wiggle_y",
    "wiggle_x",
    "wiggle_phase_y",
    "wiggle_phase_x",
    *tuple(
        f"{k}_{r}"
        for r in ("proximal", "mid", "distal")
        for k in ("centre", "half_length", "angle", "eccentricity", "calcified")
    ),
    "myo_angle",
    "myo_distance",
    "texture_seed",
    "noise_seed",
)
V_HEALTHY = 262.0  # mm^3 inside the wall at vessel = 1, sex = 0
_R_PROXIMAL, _R_DISTAL = 1.55, 1.15  # mm, healthy inner radius profile along the segment
_STREAMS = 32
_CANDIDATE_RADIUS = 4.5  # mm around the FOV axis: holds vessels up to 2.5x the healthy volume


def _validate(config: CCTAPhantomConfig) -> None:
    check_ranges("ccta-phantom", config, {"depth": (12, 256), "side": (8, 128)})


def sample_subjects(seed: int, split: int, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exogenous (N, 25) and physical parents (N, 7), both float32, of samples ``index``."""
    u = uniforms(seed, split, index, _STREAMS)
    z = normals(u)
    n = u.shape[0]
    vessel = np.clip(1.0 + 0.08 * z[:, 0], 0.8, 1.2)
    wall = 0.2 + 0.15 * u[:, 1]
    wiggle = np.stack([0.6 * u[:, 2], 0.6 * u[:, 3], 2 * math.pi * u[:, 4], 2 * math.pi * u[:, 5]], 1)
    plaque_geo = np.stack(
        [
            np.stack(
                [
                    0.25 + 0.5 * u[:, 6 + 5 * r],
                    4.0 + 4.0 * u[:, 7 + 5 * r],
                    2 * math.pi * u[:, 8 + 5 * r],
                    0.6 + 1.4 * u[:, 9 + 5 * r],
                    np.where(u[:, 10 + 5 * r] < 0.6, 0.0, 0.1 + 0.25 * (u[:, 10 + 5 * r] - 0.6) / 0.4),
                ],
                1,
            )
            for r in range(3)
        ],
        1,
    ).reshape(n, 15)
    myo = np.stack([2 * math.pi * u[:, 21], 3.2 + 1.6 * u[:, 22], u[:, 23], u[:, 24]], 1)
    age = np.clip(60.0 + 10.0 * z[:, 25], 30.0, 90.0)
    sex = (u[:, 26] < 0.5).astype(np.float64)
    contrast = 380.0 - 3.0 * (age - 60.0) + 35.0 * z[:, 27]
    shift = np.array([0.5, 0.0, -0.4])
    logits = shift[None] - 1.5 + 0.08 * (age - 60.0)[:, None] + 0.5 * sex[:, None] + 0.9 * z[:, 28:31]
    plaques = 5.0 + 38.0 / (1.0 + np.exp(-logits))
    lumen = V_HEALTHY * vessel**2 * (1.0 + 0.1 * sex) - plaques.sum(1)
    exo = np.concatenate([vessel[:, None], wall[:, None], wiggle, plaque_geo, myo], 1)
    pa = np.concatenate([age[:, None], sex[:, None], contrast[:, None], plaques, lumen[:, None]], 1)
    return torch.from_numpy(exo).float(), torch.from_numpy(pa).float()


def _select(field: torch.Tensor, cand: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``exact_size_mask`` restricted to the candidate voxels ``cand`` (fewer to sort)."""
    sub = exact_size_mask(field[:, cand], counts)
    return torch.zeros(field.shape, dtype=torch.bool).index_copy_(1, cand, sub)


def region_map(depth: int, side: int) -> torch.Tensor:
    """(D, H, W) int64 region ids: thirds along D numbered 1, 2, 3 from the proximal end."""
    ids = 1 + (torch.arange(depth) * 3) // depth
    return ids.view(depth, 1, 1).expand(depth, side, side).clone()


def render(
    exogenous: torch.Tensor, parents: torch.Tensor, depth: int = 64, side: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw vessels: (B, 25) exogenous, (B, 7) physical parents -> image (B, 1, D, H, W) in
    [-1, 1], mask (B, D, H, W) int64, regions (B, D, H, W) int64. Deterministic and batched."""
    exo = exogenous.float()
    pa = parents.float()
    b = exo.shape[0]
    sd, sh = FOV_MM[0] / depth, FOV_MM[1] / side
    voxel = sd * sh * sh
    n_vox = depth * side * side
    zc = (torch.arange(depth, dtype=torch.float32) + 0.5) * sd
    yc = (torch.arange(side, dtype=torch.float32) + 0.5) * sh - FOV_MM[1] / 2
    zz = zc.view(1, depth, 1, 1)
    wall = exo[:, 1].view(-1, 1, 1, 1)
    amp_y, amp_x, ph_y, ph_x = (exo[:, 2 + k].view(-1, 1, 1, 1) for k in range(4))
    cy = amp_y * torch.sin(2 * math.pi * zz / FOV_MM[0] + ph_y)
    cx = amp_x * torch.sin(2 * math.pi * zz / (0.7 * FOV_MM[0]) + ph_x)
    dy = yc.view(1, 1, side, 1) - cy
    dx = yc.view(1, 1, 1, side) - cx
    r = torch.sqrt(dy * dy + dx * dx)
    phi = torch.atan2(dy, dx)
    profile = _R_PROXIMAL + (_R_DISTAL - _R_PROXIMAL) * zz / FOV_MM[0]
    rho = (r / profile).expand(b, depth, side, side).reshape(b, n_vox)
    # Candidates for the vessel: an in-plane disc wide enough for any plausible calibre.
    disc = (yc.view(-1, 1) ** 2 + yc.view(1, -1) ** 2) < _CANDIDATE_RADIUS**2
    cand = torch.nonzero(disc.expand(depth, side, side).reshape(-1)).view(-1)

    plaque_vol = pa[:, 3:6]
    inner_count = torch.round((pa[:, 6] + plaque_vol.sum(1)) / voxel)
    inner = _select(rho, cand, inner_count)
    scale = torch.where(inner, rho, torch.zeros_like(rho)).amax(1).clamp(min=1e-3)
    regions = region_map(depth, side)
    reg_flat = regions.reshape(1, n_vox)

    depth_in = (1.0 - rho / scale.view(-1, 1)).clamp(0.0, 1.0)  # 0 at the wall, 1 on the axis
    phi_flat = phi.expand(b, depth, side, side).reshape(b, n_vox)
    z_flat = zz.expand(b, depth, side, side).reshape(b, n_vox)
    plaque = torch.zeros(b, n_vox, dtype=torch.bool)
    third = FOV_MM[0] / 3
    inf = torch.tensor(float("inf"))
    for j in range(3):
        centre, half, angle, ecc = (exo[:, 6 + 5 * j + k].view(-1, 1) for k in range(4))
        zj = (j + centre) * third
        score = depth_in + ecc * (1 - torch.cos(phi_flat - angle)) / 2 + ((z_flat - zj) / half) ** 2
        score = torch.where(inner & (reg_flat == j + 1), score, inf)
        plaque |= _select(score, cand, torch.round(plaque_vol[:, j] / voxel))
    lumen = inner & ~plaque
    mask = torch.zeros(b, n_vox, dtype=torch.int64)
    mask[lumen] = 1
    mask[plaque] = 2
    mask = mask.view(b, depth, side, side)

    # Attenuation in HU: fat, myocardium, wall, lumen, plaque with calcified spots, noise.
    shape = (depth, side, side)
    tex_seed, noise_seed = seed_ints(exo[:, 23]), seed_ints(exo[:, 24])
    tex = smooth_field(tex_seed, shape, (4, 8), salt=1)
    fine = smooth_field(tex_seed, shape, (16,), salt=2)
    contrast = pa[:, 2].view(-1, 1, 1, 1)
    myo_angle, myo_dist = exo[:, 21].view(-1, 1, 1, 1), exo[:, 22].view(-1, 1, 1, 1)
    along = yc.view(1, 1, side, 1) * torch.sin(myo_angle) + yc.view(1, 1, 1, side) * torch.cos(myo_angle)
    surface = myo_dist + 0.6 * torch.sin(2 * math.pi * zz / FOV_MM[0] * 1.5 + myo_angle)
    myo = torch.sigmoid((along - surface) / 0.35)
    hu = -90.0 + 18.0 * tex
    hu = hu + myo * (170.0 + 0.15 * contrast + 15.0 * fine)
    ring = (rho <= scale.view(-1, 1) * (1 + wall.view(-1, 1))) & ~inner
    hu = torch.where(ring.view(b, *shape), torch.full_like(hu, 45.0) + 10 * fine, hu)
    d_in = depth_in.view(b, *shape)
    lum = lumen.view(b, *shape)
    hu = torch.where(lum, contrast * (0.82 + 0.18 * d_in.clamp(max=0.5) * 2) + 12.0 * fine, hu)
    calc_frac = torch.stack([exo[:, 10], exo[:, 15], exo[:, 20]], 1)
    calc_thr = calc_frac.gather(1, (regions.reshape(1, n_vox) - 1).expand(b, n_vox)).view(b, *shape)
    spots = smooth_field(tex_seed, shape, (12, 20), salt=3)
    calcified = plaque.view(b, *shape) & (torch.sigmoid(spots * 2.0) < calc_thr)
    plq = torch.where(calcified, torch.full_like(hu, 750.0), 40.0 + 15.0 * fine)
    hu = torch.where(plaque.view(b, *shape), plq, hu)
    hu = hu + 15.0 * pixel_noise(noise_seed, shape)
    img = ((hu - 250.0) / 500.0).clamp(-1.0, 1.0).unsqueeze(1)
    return img, mask, regions.unsqueeze(0).expand(b, *shape).clone()


@functools.lru_cache(maxsize=8)
def _info(seed: int, depth: int, side: int, train_size: int) -> DatasetInfo:
    _, pa = sample_subjects(seed, 0, np.arange(train_size))
    return DatasetInfo(
        name=NAME,
        spatial_dims=3,
        shape=(depth, side, side),
        spacing=(FOV_MM[0] / depth, FOV_MM[1] / side, FOV_MM[2] / side),
        structures=dict(STRUCTURES),
        variables=list(VARIABLES),
        normalisation=fit_normalisation(VARIABLES, pa.double().tolist()),
        regions=dict(REGIONS),
    )


def dataset_info(config: CCTAPhantomConfig | None = None) -> DatasetInfo:
    """Metadata of the phantom, normalisation fitted on the training split."""
    config = config or CCTAPhantomConfig()
    _validate(config)
    return _info(config.seed, config.depth, config.side, config.train_size)


def build(config: CCTAPhantomConfig | None, split: str) -> PhantomDataset:
    """The ``split`` (train, val, test) of the phantom as a map-style Dataset with ``render``."""
    config = config or CCTAPhantomConfig()
    check_split(split)
    info = dataset_info(config)
    return PhantomDataset(
        info,
        split,
        getattr(config, f"{split}_size"),
        functools.partial(sample_subjects, config.seed),
        functools.partial(render, depth=config.depth, side=config.side),
    )
