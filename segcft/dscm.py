"""The deep structural causal model: parent mechanisms (an SCM over scalar variables) plus an
image mechanism (the generator), with abduction-action-prediction for both (docs/method.md sections 1-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from segcft.data.variables import DatasetInfo

__all__ = ["DSCM", "Abduction", "Intervention", "ParentMechanisms", "affected_mask", "permutation_intervention"]


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

    mechanisms: Any  # a ParentMechanisms module
    generator: Any  # a segcft.protocols.Generator module

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
        x_cf, var = self.image_counterfactual(x, pa, pa_cf, particles=particles)
        return x_cf, pa_cf, var

    def image_counterfactual(
        self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor, particles: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_cf, per-pixel variance or None) under counterfactual parents already computed by
        :meth:`parents_counterfactual` (the image half of :meth:`counterfactual`)."""
        return self.generator.counterfactual(x, pa, pa_cf, particles=particles)

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, particles: int = 1) -> Abduction:
        """Abduct x once, to decode it under any number of parent vectors (evaluation)."""
        return Abduction(self.generator, x, pa, particles)

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


class Abduction:
    """Latents z ~ q(z | x, pa) (``particles`` draws per subject, particle-major) and the pixel
    noise u = (x - mu) / sigma under the factual parents: a counterfactual under any parents
    then costs one decode, x_cf = clamp(mu* + sigma* u, -1, 1), averaged over particles. With
    the same draws, :meth:`under` is the generator's own ``counterfactual``."""

    def __init__(self, generator: Any, x: torch.Tensor, pa: torch.Tensor, particles: int = 1) -> None:
        self.generator = generator
        self.particles = particles
        self.x = _tile(x, particles)
        self.pa = _tile(pa, particles)
        self.latents = generator.abduct(self.x, self.pa)
        self.loc, self.scale = generator.decode(self.latents, self.pa)
        self.u = (self.x.float() - self.loc) / self.scale

    def null(self) -> torch.Tensor:
        """The counterfactual under the factual parents (x up to clamping and rounding)."""
        return self._mean((self.loc + self.scale * self.u).clamp(-1.0, 1.0))

    def under(self, pa_cf: torch.Tensor) -> torch.Tensor:
        """The counterfactual under the parents ``pa_cf`` (B, P)."""
        loc, scale = self.generator.decode(self.latents, _tile(pa_cf, self.particles))
        return self._mean((loc + scale * self.u).clamp(-1.0, 1.0))

    def under_with_mean(self, pa_cf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the counterfactual under ``pa_cf``, the decoder's mean mu* alone): from one decode,
        for checks that ask how much of the counterfactual the pixel noise u carries."""
        loc, scale = self.generator.decode(self.latents, _tile(pa_cf, self.particles))
        return self._mean((loc + scale * self.u).clamp(-1.0, 1.0)), self._mean(loc)

    def _mean(self, x_cf: torch.Tensor) -> torch.Tensor:
        if self.particles == 1:
            return x_cf
        return x_cf.reshape(self.particles, -1, *x_cf.shape[1:]).mean(0)


def _tile(t: torch.Tensor, times: int) -> torch.Tensor:
    """``times`` copies of a batch along the batch axis, copy-major."""
    return t if times == 1 else t.repeat(times, *([1] * (t.dim() - 1)))


def affected_mask(info: DatasetInfo, intervened: str, device: Any = None) -> torch.Tensor:
    """(P,) bool: the intervened variable and its descendants (the ones whose values change)."""
    changed = {intervened} | info.descendants(intervened)
    return torch.tensor([v in changed for v in info.variable_names], dtype=torch.bool, device=device)
