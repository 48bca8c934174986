"""The deep structural causal model: parent mechanisms (an SCM over scalar variables) plus an
image mechanism (the generator), with abduction-action-prediction for both (docs/method.md sections 1-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from segcft.data.variables import DatasetInfo

__all__ = ["DSCM", "Intervention", "ParentMechanisms", "affected_mask", "permutation_intervention"]


class ParentMechanisms(Protocol):
    """What the DSCM needs from the parent SCM (``segcft.models.mechanisms.ParentSCM``)."""

    def counterfactual(self, pa: torch.Tensor, interventions: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Intervention:
    """do(variable = values) on a batch, in normalised units; ``values`` has shape (B,)."""

    variable: str
    values: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {self.variable: self.values}


def permutation_intervention(
    info: DatasetInfo,
    pa: torch.Tensor,
    generator: torch.Generator | None = None,
    variables: list[str] | None = None,
) -> Intervention:
    """One random intervention for a batch: a variable chosen uniformly (among ``variables``,
    default all), its new values the batch's own values permuted (draws from the empirical
    marginal, as in counterfactual fine-tuning). The permutation is uniform, so a subject may
    keep its own value: a null intervention, which also trains composition."""
    names = variables if variables is not None else info.variable_names
    if not names:
        raise ValueError("permutation_intervention needs at least one variable")
    k = int(torch.randint(len(names), (1,), generator=generator).item())
    name = names[k]
    perm = torch.randperm(pa.shape[0], generator=generator).to(pa.device)
    return Intervention(name, pa[perm, info.index(name)].detach().clone())


class DSCM(nn.Module):
    """Parents SCM + image generator: counterfactual parents by the mechanisms, counterfactual
    images by the generator's abduction of z and of the pixel noise (docs/method.md section 3.3)."""

    def __init__(self, info: DatasetInfo, mechanisms: nn.Module, generator: nn.Module) -> None:
        super().__init__()
        self.info = info
        self.mechanisms = mechanisms
        self.generator = generator

    def parents_counterfactual(
        self, pa: torch.Tensor, interventions: dict[str, torch.Tensor] | Intervention
    ) -> torch.Tensor:
        """Abduct the parents' noise, apply do(), recompute descendants (normalised units)."""
        if isinstance(interventions, Intervention):
            interventions = interventions.as_dict()
        for name in interventions:
            self.info.index(name)  # KeyError naming the unknown variable
        with torch.no_grad():
            return self.mechanisms.counterfactual(pa, interventions).to(pa.dtype)

    def counterfactual(
        self,
        x: torch.Tensor,
        pa: torch.Tensor,
        interventions: dict[str, torch.Tensor] | Intervention,
        particles: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x_cf, pa_cf, per-pixel variance or None): the full abduction-action-prediction.
        Differentiable in the generator's weights (used by fine-tuning)."""
        pa_cf = self.parents_counterfactual(pa, interventions)
        x_cf, var = self.generator.counterfactual(x, pa, pa_cf, particles=particles)
        return x_cf, pa_cf, var

    def counterfactual_with_elbo(
        self, x: torch.Tensor, pa: torch.Tensor, interventions: dict[str, torch.Tensor] | Intervention
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_cf, pa_cf, generator.elbo(x, pa)): what one fine-tuning step needs. A generator
        with ``elbo_counterfactual`` shares one posterior pass (one z draw) between the real
        batch's ELBO and the abduction; any other pays an abduction and an ELBO pass."""
        pa_cf = self.parents_counterfactual(pa, interventions)
        fused = getattr(self.generator, "elbo_counterfactual", None)
        if callable(fused):
            elbo, x_cf = fused(x, pa, pa_cf)
        else:
            x_cf, _ = self.generator.counterfactual(x, pa, pa_cf)
            elbo = self.generator.elbo(x, pa)
        return x_cf, pa_cf, elbo

    def random_counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Intervention]:
        """One fine-tuning draw: a permutation intervention on a uniformly chosen variable,
        descendants propagated by the mechanisms, the counterfactual image generated."""
        do = permutation_intervention(self.info, pa, generator)
        x_cf, pa_cf, _ = self.counterfactual(x, pa, do)
        return x_cf, pa_cf, do

    def extra_repr(self) -> str:
        return f"dataset={self.info.name!r}, variables={self.info.variable_names}"


def affected_mask(info: DatasetInfo, intervened: str, device: Any = None) -> torch.Tensor:
    """(P,) bool: the intervened variable and its descendants (the ones whose values change)."""
    changed = {intervened} | info.descendants(intervened)
    return torch.tensor([v in changed for v in info.variable_names], dtype=torch.bool, device=device)
