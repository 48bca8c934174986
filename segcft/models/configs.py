"""Typed configs of the built-in models (torch-free, so registering them is cheap).

Each field has a default and a ``help`` string in its metadata; ``segcft list --verbose``
prints them and the config loader type-checks YAML values and --set overrides against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HVAEConfig:
    """Conditional hierarchical VAE (METHOD.md section 2)."""

    preset: str = field(default="64", metadata={"help": "architecture preset: 64, 192 or 3d"})
    beta: float = field(default=1.0, metadata={"help": "KL weight"})


@dataclass
class UNetConfig:
    """MONAI UNet segmentor."""

    channels: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata={"help": "feature widths per level"})


@dataclass
class CNNRegressorConfig:
    """Small CNN predicting every variable from the image."""

    width: int = field(default=16, metadata={"help": "channels of the first conv"})


@dataclass
class MechanismsConfig:
    """Parent mechanisms (the SCM over scalar variables)."""

    hidden: int = field(default=32, metadata={"help": "MLP width of the conditional mechanisms"})
