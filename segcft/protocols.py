"""The contracts between pipeline stages (docs/design.md, "Contracts"), as typing Protocols.

Plugins implement these; training, the fine-tuning objectives and evaluation only rely on them.
Batches are dicts (docs/design.md, "Data flow"): ``image`` (B, 1, *S) in [-1, 1], ``mask``
(B, *S) int64 class indices (0 background, then ``DatasetInfo.class_names``), ``regions``
(B, *S) int64 region ids (optional), ``parents`` (B, P) normalised float32, ``exogenous`` (B, E)
float32 (phantoms only), ``index`` (B,) int64 sample index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch stays out of the import path of the CLI and the registry
    import torch

    from segcft.data.variables import DatasetInfo

COMPONENT_KINDS: tuple[str, ...] = ("dataset", "generator", "segmentor", "regressor")
"""The components a run config names in its sections of the same names (``dataset: {name: ...}``)."""
KINDS: tuple[str, ...] = (*COMPONENT_KINDS, "objective")
"""Everything plugins register by name: the components and the fine-tuning objectives (``cft.modes``)."""
GUIDES: tuple[str, ...] = ("segmentor", "regressor")
"""The frozen components an objective may guide with, in the order fine-tuning loads them."""
OBJECTIVE_NEEDS: tuple[str, ...] = (*GUIDES, "structures", "regions")
"""What an objective may declare it ``needs``: a guide, the dataset's structure variables or its regions."""


@runtime_checkable
class Generator(Protocol):
    """Image mechanism x = g(z, u; pa). An ``nn.Module``; ``spatial_dims`` is 2 or 3."""

    spatial_dims: int

    def elbo(self, x: torch.Tensor, pa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel terms averaged over the batch: ``loss`` (nll + beta*kl), ``nll``, ``kl``;
        also ``nelbo`` (B,), the per-sample loss, for constraints and evaluation."""

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> Any:
        """Exogenous latents z ~ q(z | x, pa) (an object ``decode`` accepts; differentiable)."""

    def decode(self, latents: Any, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Likelihood loc and scale (B, 1, *S) for latents under parents ``pa``."""

    def counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_cf = clamp(mu* + sigma* (x - mu) / sigma, -1, 1), averaged over ``particles`` z draws;
        returns (x_cf, per-pixel variance over particles or None when particles == 1)."""

    def sample(self, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Draw x from the prior given parents."""


@runtime_checkable
class Segmentor(Protocol):
    """``forward(x) -> logits (B, C, *S)``; ``classes[0]`` is background."""

    classes: tuple[str, ...]
    spatial_dims: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Regressor(Protocol):
    """Anti-causal predictor of every variable from the image (and optionally each variable's
    causal parents), frozen during fine-tuning."""

    spatial_dims: int

    def __call__(self, x: torch.Tensor, parents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``loc`` (B, P) (logit for binary variables) and ``scale`` (B, P) (1 for binary); a
        regressor may condition on the normalised ``parents`` (B, P), and predicts them when None."""

    def nll(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-variable negative log-likelihood (B, P) of normalised targets (binary: 0/1 or
        soft probabilities, Bernoulli cross-entropy; continuous: Gaussian)."""


@runtime_checkable
class Dataset(Protocol):
    """A map-style torch Dataset of sample dicts (the batch format without the B axis).

    Optional module-level functions next to the dataset's factory (docs/plugins.md): ``dataset_info(config)
    -> DatasetInfo`` and ``dataset_dims(config) -> int | None`` (cheap metadata while a config is
    resolved), and ``check(config) -> list`` of problems (``segcft.data.folder.Problem`` or str),
    which ``segcft data check`` reports before its generic checks of every split's samples."""

    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Phantom(Dataset, Protocol):
    """A dataset that can redraw a subject: the exact counterfactual of every intervention."""

    def render(
        self, exogenous: torch.Tensor, parents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, E) exogenous and (B, P) *physical* parent values -> image (B, 1, *S) in [-1, 1],
        mask (B, *S) int64, regions (B, *S) int64 or None. Deterministic."""


@runtime_checkable
class Objective(Protocol):
    """What fine-tuning uses of an objective: the Lagrangian of one mode on a batch, with its
    multiplier ``lmbda`` (>= 0). Objectives subclass ``segcft.objectives.base.CFTObjective``,
    which implements all of it but the guidance term ``guide_loss``."""

    lmbda: torch.nn.Parameter

    def __call__(
        self, dscm: Any, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """``loss`` (a scalar to backpropagate into the generator and ``lmbda``), ``variable`` (the
        intervened variable's name) and any floats to log."""

    def lagrange_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser that ascends ``lmbda``."""

    def clamp_lambda(self) -> None:
        """Project ``lmbda`` back onto its feasible set after each ascent step."""
