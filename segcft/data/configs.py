"""Typed configs of the built-in datasets (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CXRPhantomConfig:
    """2D chest X-ray phantom (field of view 352 mm whatever the size)."""

    size: int = field(default=64, metadata={"help": "image side in pixels (16 to 256)"})
    seed: int = field(default=0, metadata={"help": "seed of the generated population"})
    train_size: int = field(default=4096, metadata={"help": "samples in the train split"})
    val_size: int = field(default=512, metadata={"help": "samples in the val split"})
    test_size: int = field(default=512, metadata={"help": "samples in the test split"})


@dataclass
class CCTAPhantomConfig:
    """3D straightened coronary artery phantom (field of view 48 x 12.8 x 12.8 mm)."""

    seed: int = field(default=0, metadata={"help": "seed of the generated population"})
    depth: int = field(default=64, metadata={"help": "voxels along the vessel (D axis, 12 to 256)"})
    side: int = field(default=32, metadata={"help": "voxels across the vessel (H and W axes, 8 to 128)"})
    train_size: int = field(default=1024, metadata={"help": "samples in the train split"})
    val_size: int = field(default=256, metadata={"help": "samples in the val split"})
    test_size: int = field(default=256, metadata={"help": "samples in the test split"})


@dataclass
class TiffConfig:
    """User data stored as TIFF images, masks and a CSV of variables (see segcft.data.tiff)."""

    path: str = field(default="", metadata={"help": "dataset folder containing dataset.yaml"})
    size: tuple[int, ...] = field(
        default=(),
        metadata={"help": "target shape, slowest axis first (empty: the files' shape, which must then agree)"},
    )
    fit: str = field(
        default="resize",
        metadata={"help": "how to reach size: resize (images linear, masks nearest) or crop (centre crop/pad)"},
    )


@dataclass
class NiftiConfig:
    """User data stored as 3D NIfTI images, masks and a CSV of variables (see segcft.data.nifti)."""

    path: str = field(default="", metadata={"help": "dataset folder containing dataset.yaml"})
    size: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "target shape (D, H, W) after resampling, centre crop/pad "
            "(empty: the median resampled shape of the train split)"
        },
    )
