"""Typed configs of the example components (torch-free: segcft reads them when listing and
validating configs, before any model is built)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlobsConfig:
    """Toy 2D dataset: one bright disc ("blob") on a noisy background."""

    size: int = field(default=32, metadata={"help": "image side in pixels (16 to 128)"})
    seed: int = field(default=0, metadata={"help": "seed of the generated population"})
    train_size: int = field(default=256, metadata={"help": "subjects in the train split"})
    val_size: int = field(default=64, metadata={"help": "subjects in the val split"})
    test_size: int = field(default=64, metadata={"help": "subjects in the test split"})


@dataclass
class CVAEConfig:
    """Toy conditional VAE with one latent map at 1/4 resolution."""

    width: int = field(default=16, metadata={"help": "channels of the hidden convs"})
    z_channels: int = field(default=4, metadata={"help": "latent channels"})
    beta: float = field(default=1.0, metadata={"help": "KL weight"})


@dataclass
class ConvSegmentorConfig:
    """Toy fully convolutional segmentor (no down-sampling)."""

    width: int = field(default=8, metadata={"help": "channels of the hidden convs"})
    depth: int = field(default=3, metadata={"help": "number of hidden 3x3 convs"})
