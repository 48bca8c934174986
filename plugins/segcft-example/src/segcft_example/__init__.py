"""segcft-example: the template segcft plugin.

segcft finds this module through the ``segcft`` entry point in pyproject.toml and calls the
hooks below. Registration records factories as ``"module:attr"`` strings, so listing plugins
never imports torch or the model code; segcft imports a factory only to build the component.
"""

from __future__ import annotations

from typing import Callable

import segcft

from segcft_example.configs import BlobsConfig, ConvSegmentorConfig, CVAEConfig

SEGCFT_PLUGIN_API_VERSION = 1
"""The segcft plugin API this plugin was written for (segcft.PLUGIN_API_VERSION)."""


@segcft.hookimpl
def segcft_register_datasets(register: Callable[..., None]) -> None:
    """``example-blobs``: build(config, split) -> Dataset (a Phantom: it can redraw subjects)."""
    register(
        "example-blobs",
        "segcft_example.blobs:build",
        config=BlobsConfig,
        dims=(2,),
        description="toy 2D phantom: one disc whose area depends on its intensity",
    )


@segcft.hookimpl
def segcft_register_generators(register: Callable[..., None]) -> None:
    """``example-cvae``: build(config, info) -> nn.Module (Generator protocol)."""
    register(
        "example-cvae",
        "segcft_example.models:build_generator",
        config=CVAEConfig,
        dims=(2,),
        description="toy conditional VAE (one latent map) with pixel-noise abduction",
    )


@segcft.hookimpl
def segcft_register_segmentors(register: Callable[..., None]) -> None:
    """``example-convnet``: build(config, info) -> nn.Module (Segmentor protocol)."""
    register(
        "example-convnet",
        "segcft_example.models:build_segmentor",
        config=ConvSegmentorConfig,
        dims=(2,),
        description="toy fully convolutional segmentor",
    )
