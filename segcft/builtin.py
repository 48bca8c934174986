"""The built-in components, registered through the same hooks as any third-party plugin.

Factories are lazy ``"module:attr"`` strings and configs are torch-free dataclasses, so this
module imports neither torch nor model code.
"""

from __future__ import annotations

from collections.abc import Callable

from segcft import PLUGIN_API_VERSION, hookimpl
from segcft.data.configs import CCTAPhantomConfig, CXRPhantomConfig, NiftiConfig, TiffConfig
from segcft.models.configs import CNNRegressorConfig, HVAEConfig, UNetConfig
from segcft.objectives.configs import NoSettings, SegSettings

SEGCFT_PLUGIN_API_VERSION = PLUGIN_API_VERSION


@hookimpl
def segcft_register_datasets(register: Callable[..., None]) -> None:
    """The two phantoms (exact counterfactuals) and user data stored as TIFF or NIfTI files."""
    register(
        "cxr-phantom",
        "segcft.data.cxr_phantom:build",
        config=CXRPhantomConfig,
        dims=(2,),
        description="2D chest X-ray phantom: lungs and heart, with exact counterfactuals",
    )
    register(
        "ccta-phantom",
        "segcft.data.ccta_phantom:build",
        config=CCTAPhantomConfig,
        dims=(3,),
        description="3D straightened coronary artery phantom with plaque per segment region",
    )
    register(
        "tiff",
        "segcft.data.tiff:build",
        config=TiffConfig,
        dims=(2, 3),
        description="user data: TIFF images and masks with a CSV of variables (dataset.yaml)",
    )
    register(
        "nifti",
        "segcft.data.nifti:build",
        config=NiftiConfig,
        dims=(3,),
        description="user data: 3D NIfTI images and masks (any orientation/spacing) with a CSV of variables",
    )


@hookimpl
def segcft_register_generators(register: Callable[..., None]) -> None:
    """The conditional hierarchical VAE image mechanism."""
    register(
        "hvae",
        "segcft.models.hvae:build",
        config=HVAEConfig,
        dims=(2, 3),
        description="conditional hierarchical VAE (VDVAE-style) with pixel-noise abduction",
    )


@hookimpl
def segcft_register_segmentors(register: Callable[..., None]) -> None:
    """The MONAI UNet segmentor."""
    register(
        "unet",
        "segcft.models.unet:build",
        config=UNetConfig,
        dims=(2, 3),
        description="MONAI UNet, softmax over the dataset's classes",
    )


@hookimpl
def segcft_register_regressors(register: Callable[..., None]) -> None:
    """The anti-causal CNN regressor."""
    register(
        "cnn",
        "segcft.models.regressor:build",
        config=CNNRegressorConfig,
        dims=(2, 3),
        description="small CNN predicting every variable from the image and its causal parents (Gaussian or Bernoulli)",
    )


@hookimpl
def segcft_register_objectives(register: Callable[..., None]) -> None:
    """The fine-tuning modes of docs/method.md section 5. Registered in this order, which fixes
    their seeds: stage ``cft-<mode>`` is seeded ``seed + 10 + index`` (none 0, reg 1, seg 2, pos-seg 3)."""
    register(
        "none",
        "segcft.objectives.guided:pretrained",
        config=NoSettings,
        description="the pre-trained generator, not fine-tuned (the baseline)",
    )
    register(
        "reg",
        "segcft.objectives.guided:build_reg",
        config=NoSettings,
        needs=("regressor",),
        description="Reg-CFT: the frozen regressor's predicted mean of every counterfactual variable",
    )
    register(
        "seg",
        "segcft.objectives.guided:build_seg",
        config=SegSettings,
        needs=("segmentor", "structures"),
        uses=("regressor",),
        description="Seg-CFT: the frozen segmentor's soft structure areas (+ regressor on subject variables)",
    )
    register(
        "pos-seg",
        "segcft.objectives.guided:build_pos_seg",
        config=SegSettings,
        needs=("segmentor", "structures", "regions"),
        uses=("regressor",),
        description="Pos-Seg-CFT: soft structure areas per region (+ regressor on subject variables)",
    )
