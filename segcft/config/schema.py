"""The run configuration's dataclasses (``RunConfig`` and its sections) and the constants that
name presets and bound seeds. Pure data: checking and merging live in segcft/config/types.py and
segcft/config/resolve.py."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from segcft.models.configs import MechanismsConfig

PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
DEFAULT_PRESET = "quick"
OVERLAY_3D = "when_3d"
"""Preset key of the overlay applied only when the resolved dataset is 3D (see :func:`read_preset`)."""


@dataclass
class ComponentConfig:
    """A pluggable component: the registered ``name`` and its config dataclass instance."""

    name: str = ""
    params: Any = None


SEED_MAX = 2**63 - 1
"""Largest run seed. The stages derive their seeds from it through :func:`derived_seed`, which
keeps every derived seed a valid torch seed."""


def derived_seed(value: int) -> int:
    """A seed derived from the run seed (``seed * 1000 + rank`` and the like) folded into torch's
    seed range [0, 2**64); seeds derived from run seeds below 2**54 are unchanged."""
    return value % 2**64


LR_DECAY_HELP = (
    "learning rate over the stage: constant after warm-up, or a cosine from lr at the first step to 0 at "
    "the last (times the warm-up)"
)
"""Help of ``lr_decay``, which the train stages and ``cft`` share."""


@dataclass
class StageConfig:
    """Optimisation settings of one training stage (AdamW with linear warm-up, optionally a cosine decay)."""

    steps: int = field(default=1000, metadata={"help": "optimiser steps", "ge": 1})
    batch_size: int = field(default=32, metadata={"help": "samples per step (global, over all ranks)", "ge": 1})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate after warm-up", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "ge": 0})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps", "ge": 0})
    lr_decay: Literal["constant", "cosine"] = field(default="constant", metadata={"help": LR_DECAY_HELP})
    grad_clip: float = field(default=350.0, metadata={"help": "gradient-norm clip (0: off)", "ge": 0})
    grad_skip: float = field(
        default=0.0,
        metadata={"help": "skip updates whose gradient norm exceeds this, or is NaN (0: skip NaN only)", "ge": 0},
    )
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)", "ge": 0, "lt": 1})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})
    checkpoint_every: int = field(
        default=500, metadata={"help": "steps between checkpoints (0: end of stage only)", "ge": 0}
    )


@dataclass
class SegmentorStageConfig(StageConfig):
    """Optimisation settings of both segmentor stages plus their quality gate: after training,
    each segmentor is measured per structure variable on the validation split (Dice of the argmax
    and soft-area MAPE against the masks); a structure under ``gate_dice`` or over ``gate_mape``
    is not learned, and the segmentor is trained once more with another seed and twice the steps.
    Still not learned: the run stops (``gate: stop``) or goes on with a warning (``warn``)."""

    gate_dice: float = field(
        default=0.7,
        metadata={"help": "lowest Dice per structure on the validation split (0: no Dice check)", "ge": 0, "le": 1},
    )
    gate_mape: float = field(
        default=20.0,
        metadata={"help": "highest soft-area MAPE % per structure on the validation split (0: no MAPE check)", "ge": 0},
    )
    gate: Literal["stop", "warn"] = field(
        default="stop",
        metadata={"help": "a segmentor still not learned after its retry: stop the run, or warn and go on"},
    )
    guides: int = field(
        default=1,
        metadata={
            "help": "segmentors trained from different seeds whose mean class probabilities guide fine-tuning "
            "(stages segmentor, segmentor-2, ...): an edit must read as structure to all of them",
            "ge": 1,
            "le": 8,
        },
    )
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "optimiser steps of the evaluation segmentor (0: steps); the measuring instrument may train "
            "longer than the guides without slowing fine-tuning",
            "ge": 0,
        },
    )

    def for_stage(self, stage: str) -> SegmentorStageConfig:
        """These settings as segmentor stage ``stage`` trains with them: ``eval_steps`` (when set)
        replaces ``steps`` for ``eval_segmentor``."""
        if stage == "eval_segmentor" and self.eval_steps:
            return replace(self, steps=self.eval_steps)
        return self


@dataclass
class MechanismsStageConfig:
    """Settings of the mechanisms stage: AdamW on random minibatches of the training parents,
    with no warm-up or EMA (the stage takes seconds; its gradient-norm clip is fixed at 10 and
    its resume checkpoints come every 500 steps)."""

    steps: int = field(default=2000, metadata={"help": "optimiser steps", "ge": 1})
    batch_size: int = field(default=256, metadata={"help": "parent vectors per step", "ge": 1})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "ge": 0})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})


@dataclass
class IntensityAugmentConfig:
    """Random global intensity changes of the segmentors' training images,
    x -> clamp(a (x + 1) - 1 + b, -1, 1) with |a - 1| <= scale and |b| <= shift per image, so
    that soft areas follow shape, not brightness: fine-tuning otherwise learns to move a guide's
    areas by shifting the whole image's intensity."""

    shift: float = field(default=0.1, metadata={"help": "largest |b| (images in [-1, 1]; 0: off)", "ge": 0})
    scale: float = field(default=0.1, metadata={"help": "largest |a - 1| (0: off)", "ge": 0, "lt": 1})


@dataclass
class TrainConfig:
    """The settings of each pre-training stage, in pipeline order (the evaluation segmentor uses
    ``segmentor``'s), and the segmentors' intensity augmentation."""

    mechanisms: MechanismsStageConfig = field(default_factory=MechanismsStageConfig)
    segmentor: SegmentorStageConfig = field(default_factory=SegmentorStageConfig)
    regressor: StageConfig = field(default_factory=StageConfig)
    generator: StageConfig = field(default_factory=lambda: StageConfig(grad_skip=500.0, ema=0.999))
    segmentor_intensity: IntensityAugmentConfig = field(default_factory=IntensityAugmentConfig)


@dataclass
class CFTConfig:
    """Counterfactual fine-tuning: guidance modes, the Lagrangian and the optimiser of the
    fine-tuned generator (AdamW with betas (0.9, 0.9), like the generator stage)."""

    modes: tuple[str, ...] = field(
        default=("none", "reg", "seg"),
        metadata={"help": "fine-tuning modes to train (see 'segcft list objectives')", "names": "objective"},
    )
    objectives: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "settings of objectives that have their own: mode -> mapping", "configs": "objective"},
    )
    steps: int = field(default=1000, metadata={"help": "fine-tuning steps per mode", "ge": 1})
    batch_size: int = field(default=16, metadata={"help": "samples per step", "ge": 1})
    lr: float = field(default=1e-4, metadata={"help": "generator learning rate", "gt": 0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the generator", "ge": 0})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps", "ge": 0})
    lr_decay: Literal["constant", "cosine"] = field(default="constant", metadata={"help": LR_DECAY_HELP})
    grad_clip: float = field(default=350.0, metadata={"help": "gradient-norm clip (0: off)", "ge": 0})
    grad_skip: float = field(
        default=0.0,
        metadata={
            "help": "skip updates whose gradient norm exceeds this, or is NaN (0: skip NaN only, the default: "
            "a violated nelbo constraint scales the gradient up, and skipping those updates can stop the "
            "stage from ever restoring it)",
            "ge": 0,
        },
    )
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the weights (0: no EMA)", "ge": 0, "lt": 1})
    log_every: int = field(default=50, metadata={"help": "steps between metric log rows", "ge": 1})
    checkpoint_every: int = field(
        default=500, metadata={"help": "steps between checkpoints (0: end of stage only)", "ge": 0}
    )
    lr_lagrange: float = field(default=1e-2, metadata={"help": "learning rate of the Lagrange multiplier", "gt": 0})
    damping: float = field(default=100.0, metadata={"help": "damping d of the constraint", "ge": 0})
    lambda_init: float = field(default=0.0, metadata={"help": "initial Lagrange multiplier (>= 0)", "ge": 0})
    penalty: Literal["l1", "l2", "huber"] = field(default="l1", metadata={"help": "rho of the area loss"})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold (normalised units)", "gt": 0})
    soft_labels: bool | Literal["regressor"] = field(
        default=False,
        metadata={
            "help": "targets of the variables an intervention leaves untouched, read by the frozen guides on x "
            "(the attribute-amplification fix): true for every term, 'regressor' for the regressor's terms "
            "only (area terms keep pa* as their target), false for none"
        },
    )
    calibrate_regressor: bool = field(
        default=False,
        metadata={
            "help": "read the frozen regressor through the calibration its stage fitted on the validation split "
            "(prediction minus what the parents predict, divided by the attenuation: slope 1 on the true value); "
            "false (the default, as in the paper) reads its raw prediction"
        },
    )
    seg_weight: float = field(default=1.0, metadata={"help": "weight of the segmentor (area) terms", "gt": 0})
    reg_weight: float = field(default=1.0, metadata={"help": "weight of the regressor terms", "gt": 0})


@dataclass
class EvaluateConfig:
    """Evaluation of the fine-tuned generators."""

    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to evaluate"})
    n: int | None = field(default=None, metadata={"help": "number of subjects (null: the whole split)", "ge": 1})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples of the 95% intervals", "ge": 1})
    dilation: int = field(
        default=2, metadata={"help": "pixels the structure masks are dilated by for locality", "ge": 0}
    )
    particles: int = field(default=1, metadata={"help": "z samples averaged per counterfactual", "ge": 1})
    floor_mark: float = field(
        default=20.0,
        metadata={
            "help": "mark numbers measured by a segmentor whose soft-area MAPE % on factual images exceeds this for "
            "the structure (0: no marks)",
            "ge": 0,
        },
    )
    composition_n: int = field(
        default=16,
        metadata={
            "help": "subjects of the evaluated split on which composition is followed to m = 10 null "
            "interventions (m = 1 is measured on every subject; 0: m = 1 only)",
            "ge": 0,
        },
    )
    responsiveness_n: int = field(
        default=16,
        metadata={"help": "subjects of the evaluated split in the responsiveness check (0: no check)", "ge": 0},
    )


@dataclass
class RunConfig:
    """Everything that determines a run; written resolved to ``RUN/config.yaml``."""

    seed: int = field(
        default=0, metadata={"help": f"seed of every random draw of the run (0 to {SEED_MAX})", "ge": 0, "le": SEED_MAX}
    )
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    cpu_bf16: bool = field(
        default=False,
        metadata={"help": "on the CPU, run the network stages under bfloat16 autocast as on a GPU (opt-in speed-up)"},
    )
    cpu_lanes: int = field(
        default=2,
        metadata={
            "help": "on the CPU (one process), train stages that need not wait for each other (segmentors, "
            "regressor, mechanisms, and the generator where that ends sooner; the fine-tuning modes) side by "
            "side in up to this many processes, the CPU threads split between them (1: one after another)",
            "ge": 1,
        },
    )
    dataset: ComponentConfig = field(default_factory=ComponentConfig)
    generator: ComponentConfig = field(default_factory=ComponentConfig)
    segmentor: ComponentConfig = field(default_factory=ComponentConfig)
    eval_segmentor: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "parameters of the segmentor component that differ for the evaluation segmentor (e.g. "
            "channels: a wider measuring instrument than the guide, which fine-tuning runs at every step); "
            "empty (an empty mapping clears what earlier layers set): the same as segmentor"
        },
    )
    regressor: ComponentConfig = field(default_factory=ComponentConfig)
    mechanisms: MechanismsConfig = field(default_factory=MechanismsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cft: CFTConfig = field(default_factory=CFTConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
