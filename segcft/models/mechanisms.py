"""Parent mechanisms: the structural causal model over the dataset's scalar variables.

docs/method.md section 2. Every continuous variable is an invertible function of its own noise
eps_i ~ N(0, 1) and its parents; binary variables are Bernoulli with logits from their parents.
Everything works in normalised units (``DatasetInfo.normalise``): binary columns are 0/1.

- continuous with parents: pa_i = loc(parents) + exp(log_scale(parents)) * eps_i, with loc and
  log_scale from one MLP of the parents' normalised values;
- continuous root: pa_i = s^-1(eps_i), s a monotone rational-quadratic spline (Durkan et al.,
  2019) on [-bound, bound] with identity tails (see ``RootSpline`` for why not a library flow);
- binary: logit from an MLP of the parents, or a learned constant for roots.

Counterfactuals follow abduction, action, prediction; the rule for binary descendants is
documented on ``ParentSCM.predict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcft.data.variables import DatasetInfo
from segcft.errors import UserError
from segcft.models.configs import MechanismsConfig

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_MAX_LOG_SCALE = 5.0


def _mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    """MLP whose last layer starts at zero, so every mechanism starts as N(0, 1) or p = 0.5."""
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.LeakyReLU(0.1)]
        width = hidden
    last = nn.Linear(width, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z * z - _LOG_SQRT_2PI


class AffineMechanism(nn.Module):
    """pa = loc(parents) + exp(log_scale(parents)) * eps; log_scale softly bounded to (-5, 5)."""

    def __init__(self, n_parents: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.net = _mlp(n_parents, 2, hidden, layers)

    def _loc_log_scale(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(parents)
        return out[:, 0], _MAX_LOG_SCALE * torch.tanh(out[:, 1] / _MAX_LOG_SCALE)

    def forward(self, eps: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Noise -> value."""
        loc, log_scale = self._loc_log_scale(parents)
        return loc + torch.exp(log_scale) * eps

    def inverse(self, value: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value -> (noise, log |d noise / d value|)."""
        loc, log_scale = self._loc_log_scale(parents)
        return (value - loc) * torch.exp(-log_scale), -log_scale


class RootSpline(nn.Module):
    """Unconditional monotone rational-quadratic spline eps = s(pa) on [-bound, bound], identity
    outside (Durkan et al., "Neural Spline Flows", 2019), starting as the identity.

    Chosen over zuko's neural spline flow because a root needs only one unconditional scalar
    bijection: about a hundred lines with closed-form inverse and log-determinant, no extra
    dependency, exact round trips in float32, and state dicts that do not depend on a third-party
    module layout. Roots are standardised by the dataset normalisation, so a fixed bound of a few
    standard deviations covers the data; the spline reshapes skewed marginals inside it."""

    def __init__(self, bins: int, bound: float, min_width: float = 1e-3, min_derivative: float = 1e-3) -> None:
        super().__init__()
        if bins < 2:
            raise UserError(f"mechanisms.spline_bins must be >= 2, got {bins}")
        if bound <= 0:
            raise UserError(f"mechanisms.spline_bound must be > 0, got {bound}")
        self.bins, self.bound = bins, float(bound)
        self.min_width, self.min_derivative = min_width, min_derivative
        self.unnormalised_widths = nn.Parameter(torch.zeros(bins))
        self.unnormalised_heights = nn.Parameter(torch.zeros(bins))
        # interior derivatives; softplus(c) + min_derivative = 1 gives the identity at init
        c = math.log(math.expm1(1.0 - min_derivative))
        self.unnormalised_derivatives = nn.Parameter(torch.full((bins - 1,), c))

    def _knots(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Knot positions (bins + 1,) from -bound to bound and bin sizes (bins,)."""
        frac = self.min_width + (1 - self.min_width * self.bins) * torch.softmax(raw, dim=0)
        knots = F.pad(torch.cumsum(frac, dim=0), (1, 0))
        knots = (2 * knots - 1) * self.bound
        knots = torch.cat([knots[:1].new_full((1,), -self.bound), knots[1:-1], knots[:1].new_full((1,), self.bound)])
        return knots, knots[1:] - knots[:-1]

    def _params(self) -> tuple[torch.Tensor, ...]:
        """Knots, bin sizes and knot derivatives in float64: the closed-form inverse then round
        trips to float32 precision (these are (B,) scalars, the cost is nil)."""
        xk, w = self._knots(self.unnormalised_widths.double())
        yk, h = self._knots(self.unnormalised_heights.double())
        inner = self.min_derivative + F.softplus(self.unnormalised_derivatives.double())
        one = inner.new_ones(1)
        d = torch.cat([one, inner, one])
        return xk, w, yk, h, d

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value -> (noise, log |d noise / d value|)."""
        dtype, x = x.dtype, x.double()
        xk, w, yk, h, d = self._params()
        inside = (x >= -self.bound) & (x <= self.bound)
        xc = x.clamp(-self.bound, self.bound)
        k = torch.searchsorted(xk[1:-1].contiguous(), xc.detach().contiguous(), right=True)
        xk_, w_, yk_, h_ = xk[k], w[k], yk[k], h[k]
        d0, d1 = d[k], d[k + 1]
        s = h_ / w_
        xi = ((xc - xk_) / w_).clamp(0, 1)
        t = xi * (1 - xi)
        denom = s + (d1 + d0 - 2 * s) * t
        y = yk_ + h_ * (s * xi * xi + d0 * t) / denom
        dnum = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)
        logdet = torch.log(dnum) - 2 * torch.log(denom)
        y, logdet = torch.where(inside, y, x), torch.where(inside, logdet, torch.zeros_like(logdet))
        return y.to(dtype), logdet.to(dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Noise -> value (closed-form root of the bin's quadratic)."""
        dtype, y = y.dtype, y.double()
        xk, w, yk, h, d = self._params()
        inside = (y >= -self.bound) & (y <= self.bound)
        yc = y.clamp(-self.bound, self.bound)
        k = torch.searchsorted(yk[1:-1].contiguous(), yc.detach().contiguous(), right=True)
        xk_, w_, yk_, h_ = xk[k], w[k], yk[k], h[k]
        d0, d1 = d[k], d[k + 1]
        s = h_ / w_
        dy = yc - yk_
        c2 = d1 + d0 - 2 * s
        a = h_ * (s - d0) + dy * c2
        b = h_ * d0 - dy * c2
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = (2 * c) / (-b - torch.sqrt(disc))
        x = xk_ + xi.clamp(0, 1) * w_
        return torch.where(inside, x, y).to(dtype)


class RootFlow(nn.Module):
    """Continuous root: pa = s^-1(eps) with ``RootSpline`` s."""

    def __init__(self, bins: int, bound: float) -> None:
        super().__init__()
        self.spline = RootSpline(bins, bound)

    def forward(self, eps: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        return self.spline.inverse(eps)

    def inverse(self, value: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.spline(value)


class BernoulliMechanism(nn.Module):
    """Logit of a binary variable: an MLP of its parents, or a learned constant for a root."""

    def __init__(self, n_parents: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.net = _mlp(n_parents, 1, hidden, layers) if n_parents else None
        self.logit = nn.Parameter(torch.zeros(())) if not n_parents else None

    def forward(self, parents: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            assert self.logit is not None  # a root has the learned constant instead
            return self.logit.expand(parents.shape[0])
        return self.net(parents)[:, 0]


def _complete(cols: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Columns that are all computed by now (parents come first in topological order)."""
    out = [c for c in cols if c is not None]
    if len(out) != len(cols):
        raise RuntimeError("a variable was read before its mechanism computed it")
    return out


class ParentSCM(nn.Module):
    """The SCM over the dataset's variables, built from its DAG (``info.variables``).

    All tensors are (B, P) in the dataset's variable order and normalisation. Construct it under
    ``torch.manual_seed`` for reproducible initial weights; ``fit`` is seeded explicitly."""

    def __init__(self, info: DatasetInfo, config: MechanismsConfig | None = None) -> None:
        super().__init__()
        config = config or MechanismsConfig()
        if config.hidden < 1 or config.layers < 0:
            raise UserError(
                f"mechanisms.hidden must be >= 1 and mechanisms.layers >= 0, got {config.hidden} and {config.layers}"
            )
        if not info.variables:
            raise UserError(f"dataset {info.name!r} declares no variables: the parent SCM needs at least one")
        self.info, self.config = info, config
        names = info.variable_names
        self.order = [info.index(n) for n in info.topological_order()]
        self.binary = [v.type == "binary" for v in info.variables]
        self.parent_index = [[names.index(p) for p in v.parents] for v in info.variables]
        mechs: list[nn.Module] = []
        for v, pidx in zip(info.variables, self.parent_index):
            if v.type == "binary":
                mechs.append(BernoulliMechanism(len(pidx), config.hidden, config.layers))
            elif pidx:
                mechs.append(AffineMechanism(len(pidx), config.hidden, config.layers))
            else:
                mechs.append(RootFlow(config.spline_bins, config.spline_bound))
        self.mechanisms = nn.ModuleList(mechs)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def num_variables(self) -> int:
        return len(self.info.variables)

    def _check(self, pa: torch.Tensor, what: str = "parents") -> None:
        if pa.dim() != 2 or pa.shape[1] != self.num_variables:
            raise UserError(
                f"{what} must be a (B, {self.num_variables}) tensor in the order {self.info.variable_names}, "
                f"got shape {tuple(pa.shape)}"
            )

    def _continuous(self, i: int) -> AffineMechanism | RootFlow:
        """The mechanism of continuous variable ``i`` (these have an ``inverse``)."""
        mech = self.mechanisms[i]
        assert isinstance(mech, (AffineMechanism, RootFlow))
        return mech

    def _inputs(self, values: Sequence[torch.Tensor | None], i: int, batch: int, ref: torch.Tensor) -> torch.Tensor:
        cols = [values[j] for j in self.parent_index[i]]
        if not cols:
            return ref.new_zeros(batch, 0)
        return torch.stack(_complete(cols), dim=1)

    def _interventions(
        self, interventions: Mapping[str, torch.Tensor | float] | None, batch: int, ref: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Validated interventions keyed by column index, each a (B,) tensor like ``ref``."""
        out: dict[int, torch.Tensor] = {}
        for name, value in (interventions or {}).items():
            if name not in self.info.variable_names:
                raise UserError(f"intervention on unknown variable {name!r}; known: {self.info.variable_names}")
            i = self.info.index(name)
            t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
            if t.dim() == 0:
                t = t.expand(batch)
            if t.shape != (batch,):
                raise UserError(f"intervention {name!r} must be a scalar or a ({batch},) tensor, got {tuple(t.shape)}")
            if self.binary[i] and not bool(((t == 0) | (t == 1)).all()):
                raise UserError(f"intervention on binary variable {name!r} must be 0 or 1")
            out[i] = t
        return out

    # -- the model ----------------------------------------------------------------------------
    def log_prob(self, pa: torch.Tensor) -> torch.Tensor:
        """log p(pa) (B,): sum over variables of each mechanism's log-density (continuous, in
        normalised units) or log-probability (binary)."""
        self._check(pa)
        cols = list(pa.unbind(1))
        total = pa.new_zeros(pa.shape[0])
        for i, mech in enumerate(self.mechanisms):
            inputs = self._inputs(cols, i, pa.shape[0], pa)
            if self.binary[i]:
                total = total - F.binary_cross_entropy_with_logits(mech(inputs), cols[i], reduction="none")
            else:
                eps, logdet = self._continuous(i).inverse(cols[i], inputs)
                total = total + _std_normal_log_prob(eps) + logdet
        return total

    def abduct(self, pa: torch.Tensor) -> torch.Tensor:
        """Exogenous noise (B, P): eps_i = f_i^-1(pa_i; parents_i) for continuous variables; binary
        columns hold the observed value (their noise is not identifiable, see ``predict``)."""
        self._check(pa)
        cols = list(pa.unbind(1))
        eps = []
        for i in range(self.num_variables):
            if self.binary[i]:
                eps.append(cols[i])
            else:
                eps.append(self._continuous(i).inverse(cols[i], self._inputs(cols, i, pa.shape[0], pa))[0])
        return torch.stack(eps, dim=1)

    def _factual(self, eps: torch.Tensor) -> list[torch.Tensor]:
        """The factual world of an abducted noise: continuous f_i(eps_i; parents), binary eps_i."""
        cols: list[torch.Tensor | None] = [None] * self.num_variables
        for i in self.order:
            if self.binary[i]:
                cols[i] = eps[:, i]
            else:
                cols[i] = self.mechanisms[i](eps[:, i], self._inputs(cols, i, eps.shape[0], eps))
        return _complete(cols)

    def _propagate(self, eps: torch.Tensor, factual: list[torch.Tensor], do: dict[int, torch.Tensor]) -> torch.Tensor:
        """Counterfactual world: intervened columns set, descendants recomputed in topological
        order, everything else copied from ``factual`` exactly."""
        names = self.info.variable_names
        affected: set[int] = set()
        for i in do:
            affected |= {names.index(n) for n in self.info.descendants(names[i])}
        batch = eps.shape[0]
        cols: list[torch.Tensor | None] = [None] * self.num_variables
        for i in self.order:
            if i in do:
                cols[i] = do[i]
            elif i not in affected:
                cols[i] = factual[i]
            elif self.binary[i]:
                mech = self.mechanisms[i]
                logit_f = mech(self._inputs(factual, i, batch, eps))
                logit_cf = mech(self._inputs(cols, i, batch, eps))
                crossed = (logit_f > 0) != (logit_cf > 0)
                cols[i] = torch.where(crossed, (logit_cf > 0).to(eps.dtype), factual[i])
            else:
                cols[i] = self.mechanisms[i](eps[:, i], self._inputs(cols, i, batch, eps))
        return torch.stack(_complete(cols), dim=1)

    def predict(
        self, eps: torch.Tensor, interventions: Mapping[str, torch.Tensor | float] | None = None
    ) -> torch.Tensor:
        """Parents (B, P) from abducted noise under do(interventions) (values normalised).

        Continuous descendants of an intervened variable are f_i(eps_i; new parents). A binary
        descendant keeps its factual value unless its logit changes sign between the factual
        and the counterfactual parents, in which case it takes the counterfactual logit's sign
        (1 if the logit is > 0). This is the deterministic abduction of docs/method.md section 2.3: a
        Bernoulli noise consistent with the observation is not unique, and keeping the value
        until the mechanism's decision flips is the minimal change consistent with it. The
        factual world, needed for that comparison, is reconstructed from ``eps`` itself.
        Without interventions this returns the factual parents (up to float rounding)."""
        self._check(eps, "eps")
        factual = self._factual(eps)
        do = self._interventions(interventions, eps.shape[0], eps)
        if not do:
            return torch.stack(factual, dim=1)
        return self._propagate(eps, factual, do)

    def counterfactual(self, pa: torch.Tensor, interventions: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Counterfactual parents (B, P) under do(interventions): abduct, intervene, recompute the
        descendants of the intervened variables; every other variable keeps its observed value
        exactly. Differentiable with respect to the intervention values."""
        self._check(pa)
        eps = self.abduct(pa)
        do = self._interventions(interventions, pa.shape[0], pa)
        return self._propagate(eps, list(pa.unbind(1)), do)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n ancestral samples (n, P) in normalised units; ``generator`` makes them reproducible
        (it must live on the module's device)."""
        ref = next(self.parameters())
        device, dtype = ref.device, ref.dtype
        cols: list[torch.Tensor | None] = [None] * self.num_variables
        for i in self.order:
            mech = self.mechanisms[i]
            inputs = self._inputs(cols, i, n, torch.zeros((), device=device, dtype=dtype))
            if self.binary[i]:
                u = torch.rand(n, generator=generator, device=device, dtype=dtype)
                cols[i] = (u < torch.sigmoid(mech(inputs))).to(dtype)
            else:
                eps = torch.randn(n, generator=generator, device=device, dtype=dtype)
                cols[i] = mech(eps, inputs)
        return torch.stack(_complete(cols), dim=1)

    def nll(self, pa: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per sample of parents (B, P): the training loss."""
        return -self.log_prob(pa).mean()

    def check_training_data(self, parents: torch.Tensor) -> None:
        """UserError unless ``parents`` (N, P) are finite, with binary columns in {0, 1}."""
        self._check(parents)
        for i, is_binary in enumerate(self.binary):
            col = parents[:, i]
            if is_binary and not bool(((col == 0) | (col == 1)).all()):
                raise UserError(f"binary variable {self.info.variable_names[i]!r} has values other than 0 and 1")
        if not bool(torch.isfinite(parents).all()):
            raise UserError("parents contain NaN or infinite values")

    def fit(
        self,
        parents: torch.Tensor,
        steps: int,
        lr: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
        weight_decay: float = 1e-4,
    ) -> list[float]:
        """Maximum likelihood with AdamW on normalised parents (N, P); returns the mean negative
        log-likelihood per sample of every step's minibatch. Deterministic given ``seed``. The
        mechanisms stage runs the same steps through the training loop (segcft/train/loop.py)."""
        self._check(parents)
        if steps < 1 or batch_size < 1:
            raise UserError(f"mechanism training needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
        self.check_training_data(parents)
        data = parents.to(device=next(self.parameters()).device, dtype=torch.float32)
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)
        batches = parent_batches(data, batch_size, seed)
        losses: list[float] = []
        self.train()
        for _ in range(steps):
            loss = self.nll(next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters(), GRAD_CLIP)
            opt.step()
            losses.append(float(loss.detach()))
        self.eval()
        return losses


GRAD_CLIP = 10.0
"""Gradient-norm clip of mechanism training."""


def parent_batches(parents: torch.Tensor, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
    """Endless minibatches of ``min(batch_size, N)`` rows of ``parents`` (N, P) drawn with
    replacement from a generator seeded with ``seed``, from step ``start`` on: the draws of the
    earlier steps are replayed, so a resumed run continues the same sequence."""
    n = parents.shape[0]
    size = (min(batch_size, n),)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(start):
        torch.randint(n, size, generator=gen)
    while True:
        yield parents[torch.randint(n, size, generator=gen).to(parents.device)]
