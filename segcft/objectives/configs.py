"""Config classes of the built-in objectives (torch-free: the registry imports them)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NoSettings", "SegSettings"]


@dataclass
class NoSettings:
    """An objective without settings of its own: the built-ins read theirs from the ``cft`` section."""


@dataclass
class SegSettings:
    """Settings of the segmentor-guided objectives (seg, pos-seg) beyond the ``cft`` section's:
    the optional locality penalty and its region, and the random
    changes of the counterfactual the guide measures (docs/method.md section 5.4)."""

    locality: float = field(
        default=0.0,
        metadata={
            "help": "weight of the locality penalty: mean |x_cf - x| outside the dilated guide masks of the "
            "intervened structures (0: off)",
            "ge": 0,
        },
    )
    locality_radius: int = field(
        default=2, metadata={"help": "pixels (voxels) the locality masks are dilated by (max-pool radius)", "ge": 0}
    )
    locality_band: bool = field(
        default=False,
        metadata={
            "help": "allow changes only in the band between the guide masks of x and x_cf (widened by "
            "locality_radius), so the structure's interior is held to x as well as the outside"
        },
    )
    locality_interior: float = field(
        default=0.0,
        metadata={
            "help": "weight of a second locality term: mean |x_cf - x| over the interior the structure shares on x "
            "and x_cf (their guide masks' intersection eroded by locality_radius), averaged over the interior's "
            "own pixels so that a small structure's interior is not outweighed by the outside (0: off)",
            "ge": 0,
        },
    )
    guide_shift: int = field(
        default=0,
        metadata={
            "help": "largest random translation, in pixels (voxels) per axis and image, of the counterfactual "
            "before the guide measures its areas, edges replicated (0: off)",
            "ge": 0,
        },
    )
    guide_noise: float = field(
        default=0.0,
        metadata={
            "help": "standard deviation of Gaussian noise added to the counterfactual (images in [-1, 1]) before "
            "the guide measures its areas (0: off)",
            "ge": 0,
        },
    )
