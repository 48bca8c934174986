"""The built-in segmentor: a MONAI UNet (2D or 3D) with Dice + cross-entropy training.

MONAI is imported inside the factory, never at registration, so listing plugins stays torch-
and MONAI-free. Training uses ``segcft.models.segmentation`` (Dice + cross-entropy, optionally
class-weighted and focal: ``UNetSegmentor.loss``), which works on any segmentor's logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segcft.data.variables import DatasetInfo
from segcft.errors import ConfigError
from segcft.models.configs import UNetConfig
from segcft.models.segmentation import dice, segmentation_loss

__all__ = ["UNetSegmentor", "build", "dice", "segmentation_loss"]

_NORMS = {"instance": "INSTANCE", "batch": "BATCH"}


class UNetSegmentor(nn.Module):
    """Segmentor protocol over ``monai.networks.nets.UNet``: ``forward(x) -> logits (B, C, *S)``
    with ``classes = info.class_names`` (index 0 is background).

    Inputs of any size work: they are padded (edge replication) up to a multiple of the total
    downsampling factor and the logits are cropped back, so every logit sees real image content.

    In eval mode (the frozen guide and the evaluation segmentor) the logits are divided by
    ``measure_temperature``: every soft area, in fine-tuning and in evaluation alike, is measured
    on the sharpened softmax; the argmax, and so every label map, is unchanged."""

    def __init__(self, config: UNetConfig, info: DatasetInfo) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        channels = tuple(int(c) for c in config.channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ConfigError(
                f"segmentor.params.channels must list at least two positive widths, got {list(config.channels)}"
            )
        if config.norm not in _NORMS:
            raise ConfigError(f"segmentor.params.norm must be one of {sorted(_NORMS)}, got {config.norm!r}")
        if config.num_res_units < 0 or not 0.0 <= config.dropout < 1.0:
            raise ConfigError(
                f"segmentor.params.num_res_units must be >= 0 and dropout in [0, 1), "
                f"got {config.num_res_units} and {config.dropout}"
            )
        if info.spatial_dims not in (2, 3):
            raise ConfigError(
                f"the unet segmentor supports 2D and 3D data, dataset {info.name!r} is {info.spatial_dims}D"
            )
        self.classes: tuple[str, ...] = tuple(info.class_names)
        if config.class_weights and len(config.class_weights) != len(self.classes):
            raise ConfigError(
                f"segmentor.params.class_weights must give one weight per class {list(self.classes)}, "
                f"got {list(config.class_weights)}"
            )
        self.class_weights = tuple(float(w) for w in config.class_weights) or None
        self.focal_gamma = float(config.focal_gamma)
        self.measure_temperature = float(config.measure_temperature)
        self.spatial_dims: int = info.spatial_dims
        self.factor = 2 ** (len(channels) - 1)
        self.net = UNet(
            spatial_dims=info.spatial_dims,
            in_channels=1,
            out_channels=len(self.classes),
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=config.num_res_units,
            norm=_NORMS[config.norm],
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 1, *S) in [-1, 1] -> logits (B, C, *S)."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"expected an image batch (B, 1, *S) with {self.spatial_dims} spatial axes, got {tuple(x.shape)}"
            )
        logits = self._logits(x)
        if self.training or self.measure_temperature == 1.0:
            return logits
        return logits / self.measure_temperature

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The training loss of ``forward``'s logits (train mode) against the label mask (B, *S)."""
        return segmentation_loss(logits, mask, self.class_weights, self.focal_gamma)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits at the input's size."""
        size = x.shape[2:]
        target = [math.ceil(s / self.factor) * self.factor for s in size]
        if list(size) == target:
            return self.net(x)
        pad: list[int] = []
        for s, t in zip(reversed(size), reversed(target)):
            pad += [(t - s) // 2, t - s - (t - s) // 2]
        logits = self.net(F.pad(x, pad, mode="replicate"))
        crop = tuple(slice(p0, p0 + s) for p0, s in zip(reversed(pad[0::2]), size))
        index = (slice(None), slice(None), *crop)
        return logits[index]


def build(config: UNetConfig, info: DatasetInfo) -> UNetSegmentor:
    """Factory registered as the ``unet`` segmentor."""
    return UNetSegmentor(config, info)
