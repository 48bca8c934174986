"""Typed configs of the built-in models (torch-free, so registering them is cheap).

Each field has a default and a ``help`` string in its metadata, and its range where it has one
(``ge``/``gt``/``le``/``lt``); ``segcft list --verbose`` prints them and the config loader
type- and range-checks YAML values and --set overrides against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HVAEConfig:
    """Conditional hierarchical VAE (docs/method.md section 3).

    ``preset`` fills every architecture field left at its "preset" value (empty tuple, 0 or "");
    a field set explicitly overrides the preset. Stage lists run from the full resolution down:
    stage i has ``widths[i]`` channels, ``enc_blocks[i]`` encoder and ``dec_blocks[i]`` decoder
    blocks, and is average-pooled by ``pool[i]`` (per axis, capped at the axis size) into stage i+1.
    """

    preset: str = field(
        default="auto",
        metadata={
            "help": "architecture preset: auto (from the image shape: 3d for volumes, 64 up to 64 pixels a side, "
            "else 192), 64 (2D, CPU-sized), 192 (2D, paper scale) or 3d (64x32x32 volumes)"
        },
    )
    widths: tuple[int, ...] = field(
        default=(), metadata={"help": "channels per stage, full resolution first (empty: preset)", "ge": 1}
    )
    enc_blocks: tuple[int, ...] = field(
        default=(), metadata={"help": "encoder residual blocks per stage (empty: preset)", "ge": 0}
    )
    dec_blocks: tuple[int, ...] = field(
        default=(), metadata={"help": "decoder blocks per stage, stochastic up to z_max_res (empty: preset)", "ge": 0}
    )
    pool: tuple[int, ...] = field(
        default=(),
        metadata={"help": "average-pool factor from stage i to i+1, one fewer than stages (empty: preset)", "ge": 1},
    )
    z_dim: int = field(default=0, metadata={"help": "latent channels per stochastic block (0: preset)", "ge": 0})
    z_max_res: int = field(
        default=0,
        metadata={
            "help": "largest stage size (longest axis) with stochastic blocks; "
            "above it blocks are deterministic (0: preset)",
            "ge": 0,
        },
    )
    bias_max_res: int = field(
        default=0,
        metadata={"help": "learned decoder biases at stages whose longest axis is at most this (0: preset)", "ge": 0},
    )
    bottleneck: int = field(
        default=0, metadata={"help": "residual-branch width = stage width / bottleneck (0: preset)", "ge": 0}
    )
    block: str = field(
        default="",
        metadata={"help": "block type: bottleneck (GELU, 1-3-3-1 convs) or light (ReLU, 3-3 convs) (empty: preset)"},
    )
    beta: float = field(default=1.0, metadata={"help": "KL weight in the per-pixel nelbo", "ge": 0})
    prior: str = field(
        default="exogenous",
        metadata={
            "help": "exogenous: p(z) never sees the parents and counterfactuals keep z; conditional: p(z | pa), "
            "the latents are abducted as their standardised noise under the prior and re-drawn under the "
            "counterfactual parents",
        },
    )
    parent_maps: bool = field(
        default=False,
        metadata={
            "help": "every decoder block also adds sum_p pa_p * M_p, a learned map per parent over the stage's "
            "positions and channels (zero at init): parents can move intensity where a structure's border lies, "
            "not only through vectors broadcast over space",
        },
    )
    parent_maps_max_res: int = field(
        default=0,
        metadata={
            "help": "with parent_maps: maps only in the stages whose longest axis is at most this, coarse maps "
            "that say where a parent acts and leave the fine detail to the decoder (0: every stage; "
            "no effect without parent_maps)",
            "ge": 0,
        },
    )
    std_init: float = field(
        default=0.0,
        metadata={
            "help": "if > 0, the likelihood scale starts at this value everywhere (0: learned from a random init)",
            "ge": 0,
        },
    )
    x_logscale_min: float = field(default=-9.0, metadata={"help": "floor of the likelihood log-scale"})


@dataclass
class UNetConfig:
    """MONAI UNet segmentor: logits over background plus the dataset's structures."""

    channels: tuple[int, ...] = field(
        default=(16, 32, 64, 128),
        metadata={"help": "feature widths per level; each level after the first halves the resolution", "ge": 1},
    )
    num_res_units: int = field(default=1, metadata={"help": "residual units per level (0: plain conv blocks)", "ge": 0})
    norm: str = field(
        default="instance",
        metadata={"help": "normalisation layer: instance (never uses batch statistics) or batch"},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout probability inside the conv blocks", "ge": 0, "lt": 1}
    )
    class_weights: tuple[float, ...] = field(
        default=(),
        metadata={
            "help": "cross-entropy weight per class, background first (empty: uniform); "
            "small structures such as plaque need more than their share of voxels",
            "gt": 0,
        },
    )
    focal_gamma: float = field(
        default=0.0,
        metadata={"help": "focal exponent of the cross-entropy term (0: plain cross-entropy)", "ge": 0, "le": 5},
    )
    measure_temperature: float = field(
        default=1.0,
        metadata={
            "help": "the frozen segmentor's logits are divided by this before any soft area is measured "
            "(below 1 sharpens: diffuse background probability stops adding volume); training is unaffected",
            "gt": 0,
            "le": 1,
        },
    )


@dataclass
class CNNRegressorConfig:
    """Small CNN predicting every variable from the image and its causal parents (GroupNorm, no
    batch statistics)."""

    width: int = field(default=16, metadata={"help": "channels of the first conv", "ge": 1})
    depth: int = field(
        default=4, metadata={"help": "stride-2 stages; the width doubles at each, up to max_width", "ge": 0}
    )
    max_width: int = field(default=128, metadata={"help": "channel cap of the deepest stages", "ge": 1})
    groups: int = field(default=8, metadata={"help": "GroupNorm groups (must divide every width)", "ge": 1})
    dropout: float = field(default=0.1, metadata={"help": "dropout before the output layer", "ge": 0, "lt": 1})
    min_scale: float = field(
        default=1e-2,
        metadata={"help": "lower bound of the predicted std of continuous variables (normalised units)", "gt": 0},
    )
    beta: float = field(
        default=1.0,
        metadata={
            "help": "beta of the beta-NLL training loss: each continuous head's nll weighted by its detached "
            "scale^(2 beta) (0: plain nll, whose 1/scale^2 lets the surest variable steer the features)",
            "ge": 0,
            "le": 1,
        },
    )
    grid: int = field(
        default=2,
        metadata={"help": "cells per axis over which every stage's features are averaged for the heads", "ge": 1},
    )
    condition: bool = field(
        default=True,
        metadata={"help": "condition each variable's head on its causal parents, q(v | x, pa_v) (false: image only)"},
    )


@dataclass
class MechanismsConfig:
    """Parent mechanisms (the SCM over scalar variables, docs/method.md section 2)."""

    hidden: int = field(default=32, metadata={"help": "MLP width of the conditional mechanisms", "ge": 1})
    layers: int = field(default=2, metadata={"help": "hidden layers of each conditional MLP (0: linear)", "ge": 0})
    spline_bins: int = field(
        default=8, metadata={"help": "bins of the rational-quadratic spline of continuous roots", "ge": 2}
    )
    spline_bound: float = field(
        default=5.0,
        metadata={"help": "the root splines act on [-bound, bound] (normalised units), identity outside", "gt": 0},
    )
