"""Counterfactual fine-tuning: interventions, guidance terms and the damped Lagrangian, on small
stand-in modules (a linear parent SCM, a tiny Gaussian generator, a fixed-weight segmentor)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from segcft.objectives.area import area_terms
from segcft.objectives.base import build_objective
from segcft.objectives.modes import applicable_modes, check_mode
from segcft.data.variables import DatasetInfo, Measure, Normalisation, Variable
from segcft.dscm import DSCM, affected_mask, permutation_intervention
from segcft.errors import ConfigError

torch.set_num_threads(1)

S = 16


def make_info() -> DatasetInfo:
    variables = [
        Variable("sex", "binary"),
        Variable("age", "continuous", unit="y"),
        Variable("lung", "continuous", ("age",), "mm^2", Measure("lung")),
        Variable("heart_prox", "continuous", ("lung",), "mm^2", Measure("heart", "proximal")),
        Variable("heart_dist", "continuous", (), "mm^2", Measure("heart", "distal")),
    ]
    norm = Normalisation((0.0, 50.0, 60.0, 20.0, 20.0), (1.0, 10.0, 15.0, 5.0, 5.0))
    return DatasetInfo(
        "toy", 2, (S, S), (1.0, 1.0), {1: "lung", 2: "heart"}, variables, norm,
        regions={0: "outside", 1: "proximal", 2: "distal"},
    )


class LinearSCM(nn.Module):
    """pa_i = pa_parents * 0.5 + noise_i: abduct noise, intervene, recompute descendants."""

    def __init__(self, info: DatasetInfo) -> None:
        super().__init__()
        self.info = info

    def counterfactual(self, pa: torch.Tensor, interventions: dict[str, torch.Tensor]) -> torch.Tensor:
        info = self.info
        noise = pa.clone()
        for v in info.variables:
            j = info.index(v.name)
            for p in v.parents:
                noise[:, j] -= 0.5 * pa[:, info.index(p)]
        out = pa.clone()
        for name in info.topological_order():
            j = info.index(name)
            if name in interventions:
                out[:, j] = interventions[name]
                continue
            v = info.variable(name)
            if v.type == "binary":
                continue
            out[:, j] = noise[:, j] + sum(0.5 * out[:, info.index(p)] for p in v.parents)
        return out


class TinyGenerator(nn.Module):
    """Gaussian decoder with one conv 'encoder': enough to exercise the pixel-noise rule."""

    spatial_dims = 2

    def __init__(self, num_parents: int) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.dec = nn.Conv2d(4 + num_parents, 2, 3, padding=1)

    def abduct(self, x: torch.Tensor, pa: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.enc(x)

    def decode(self, z: torch.Tensor, pa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pa_map = pa[:, :, None, None].expand(-1, -1, *z.shape[2:])
        out = self.dec(torch.cat([z, pa_map], 1))
        return out[:, :1], nn.functional.softplus(out[:, 1:]) + 0.05

    def counterfactual(self, x, pa, pa_cf, particles=1):
        z = self.abduct(x, pa)
        mu, sigma = self.decode(z, pa)
        mu_cf, sigma_cf = self.decode(z, pa_cf)
        return (mu_cf + sigma_cf * (x - mu) / sigma).clamp(-1, 1), None

    def elbo(self, x, pa):
        z = self.abduct(x, pa)
        mu, sigma = self.decode(z, pa)
        nll = (0.5 * ((x - mu) / sigma) ** 2 + sigma.log()).flatten(1).mean(1)
        kl = 0.5 * (z**2).flatten(1).mean(1)
        nelbo = nll + kl
        return {"loss": nelbo.mean(), "nll": nll.mean(), "kl": kl.mean(), "nelbo": nelbo}


class FixedSegmentor(nn.Module):
    """Three classes from intensity: background (dark), lung (mid), heart (bright)."""

    classes = ("background", "lung", "heart")
    spatial_dims = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-6.0, 0.0, 6.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearRegressor(nn.Module):
    spatial_dims = 2

    def __init__(self, num_parents: int) -> None:
        super().__init__()
        self.head = nn.Linear(S * S, num_parents)

    def forward(self, x, parents=None):
        loc = self.head(x.flatten(1))
        return {"loc": loc, "scale": torch.ones_like(loc)}

    def nll(self, x, targets):
        return 0.5 * (self(x)["loc"] - targets) ** 2


def cfg(**kw):
    base = dict(
        lr=1e-3, lr_lagrange=1e-2, damping=100.0, lambda_init=0.0, penalty="l1", huber_delta=1.0,
        soft_labels=False, seg_weight=1.0, reg_weight=1.0,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def make_batch(info: DatasetInfo, b: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pa = torch.randn(b, len(info.variables), generator=g)
    pa[:, 0] = (pa[:, 0] > 0).float()
    regions = torch.zeros(b, S, S, dtype=torch.int64)
    regions[:, :, : S // 2] = 1
    regions[:, :, S // 2 :] = 2
    image = torch.rand(b, 1, S, S, generator=g) * 2 - 1
    return {"image": image, "parents": pa, "regions": regions}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    info = make_info()
    gen = TinyGenerator(len(info.variables))
    dscm = DSCM(info, LinearSCM(info), gen)
    return info, dscm, FixedSegmentor(), LinearRegressor(len(info.variables))


def test_permutation_intervention_is_seeded_permutation():
    info = make_info()
    pa = make_batch(info)["parents"]
    a = permutation_intervention(info, pa, torch.Generator().manual_seed(3))
    b = permutation_intervention(info, pa, torch.Generator().manual_seed(3))
    assert a.variable == b.variable and torch.equal(a.values, b.values)
    col = pa[:, info.index(a.variable)]
    assert torch.equal(torch.sort(a.values).values, torch.sort(col).values)
    seen = {permutation_intervention(info, pa, torch.Generator().manual_seed(s)).variable for s in range(60)}
    assert seen == set(info.variable_names)  # uniform over all variables


def test_parents_counterfactual_propagates_descendants_only(setup):
    info, dscm, _, _ = setup
    pa = make_batch(info)["parents"]
    new_age = pa[:, 1] + 1.0
    pa_cf = dscm.parents_counterfactual(pa, {"age": new_age})
    assert torch.allclose(pa_cf[:, 1], new_age)
    assert torch.allclose(pa_cf[:, 2] - pa[:, 2], torch.full((8,), 0.5))  # child of age
    assert torch.allclose(pa_cf[:, 3] - pa[:, 3], torch.full((8,), 0.25))  # grandchild
    assert torch.equal(pa_cf[:, [0, 4]], pa[:, [0, 4]])
    assert affected_mask(info, "age").tolist() == [False, True, True, True, False]
    with pytest.raises(KeyError, match="nope"):
        dscm.parents_counterfactual(pa, {"nope": new_age})


def test_area_terms_seg_aggregates_regions_and_pos_seg_splits_them():
    info = make_info()
    seg = area_terms(info, regional=False)
    assert seg.index.tolist() == [[1, -1], [2, -1]]
    assert seg.members == ((2,), (3, 4))
    assert seg.scale.tolist() == pytest.approx([15.0, (25.0 + 25.0) ** 0.5])
    pos = area_terms(info, regional=True)
    assert pos.index.tolist() == [[1, -1], [2, 1], [2, 2]]
    pa = torch.zeros(2, 5)
    assert pos.targets(info, pa).tolist() == [[60.0, 20.0, 20.0]] * 2
    assert seg.targets(info, pa).tolist() == [[60.0, 40.0]] * 2
    assert applicable_modes(info) == ["none", "reg", "seg", "pos-seg"]
    with pytest.raises(ConfigError, match="unknown fine-tuning mode"):
        check_mode("segg", info)


def test_gradient_reaches_generator_not_frozen_segmentor(setup):
    info, dscm, seg, reg = setup
    obj = build_objective("pos-seg", info, cfg(), eps=10.0, segmentor=seg, regressor=reg)
    assert not any(p.requires_grad for p in seg.parameters())
    assert [n for n, _ in obj.named_parameters()] == ["lmbda"]
    out = obj(dscm, make_batch(info), torch.Generator().manual_seed(0))
    out["loss"].backward()
    grads = [p.grad for p in dscm.generator.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in seg.parameters())
    assert all(p.grad is None for p in reg.parameters())
    assert obj.lmbda.grad is not None


def _steps(obj, dscm, info, n, lr=1e-3):
    opt = torch.optim.Adam(dscm.generator.parameters(), lr=lr)
    lopt = obj.lagrange_optimizer()
    g = torch.Generator().manual_seed(1)
    history = []
    for i in range(n):
        out = obj(dscm, make_batch(info, seed=i), g)
        opt.zero_grad()
        lopt.zero_grad()
        out["loss"].backward()
        opt.step()
        lopt.step()
        obj.clamp_lambda()
        history.append((out, float(obj.lmbda.detach())))
    return history


def test_lambda_rises_while_violated_and_stays_nonnegative(setup):
    info, dscm, seg, reg = setup
    with torch.no_grad():
        nelbo = float(dscm.generator.elbo(make_batch(info)["image"], make_batch(info)["parents"])["loss"])
    violated = build_objective("seg", info, cfg(damping=0.0), eps=nelbo - 5.0, segmentor=seg, regressor=reg)
    lambdas = [lam for _, lam in _steps(violated, dscm, info, 6)]
    assert all(b > a for a, b in zip(lambdas, lambdas[1:])), lambdas
    assert lambdas[-1] > 0.04

    satisfied = build_objective("seg", info, cfg(lambda_init=0.02), eps=nelbo + 50.0, segmentor=seg)
    lambdas = [lam for _, lam in _steps(satisfied, dscm, info, 6)]
    assert min(lambdas) == 0.0 and all(lam >= 0.0 for lam in lambdas)


def test_seg_cft_reduces_guide_loss(setup):
    info, dscm, seg, _ = setup
    obj = build_objective("seg", info, cfg(damping=0.0), eps=1e3, segmentor=seg)
    batch = make_batch(info, b=16, seed=5)
    do = permutation_intervention(info, batch["parents"], torch.Generator().manual_seed(0), ["lung"])
    opt = torch.optim.Adam(dscm.generator.parameters(), lr=2e-2)
    losses = []
    for _ in range(40):
        out = obj(dscm, batch, intervention=do)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["guide"])
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


def test_soft_labels_use_factual_measurements_for_untouched_terms(setup):
    info, dscm, seg, reg = setup
    batch = make_batch(info)
    do = permutation_intervention(info, batch["parents"], torch.Generator().manual_seed(0), ["sex"])
    hard = build_objective("seg", info, cfg(), eps=1e3, segmentor=seg, regressor=reg)
    soft = build_objective("seg", info, cfg(soft_labels=True), eps=1e3, segmentor=seg, regressor=reg)
    # The identity "generator" makes x_cf == x: soft labels then match exactly, hard ones do not.
    identity = DSCM(info, LinearSCM(info), IdentityGenerator())
    x_cf, pa_cf, _ = identity.counterfactual(batch["image"], batch["parents"], do)
    _, logs_soft = soft.guide_loss(x_cf, pa_cf, batch, do.variable)
    _, logs_hard = hard.guide_loss(x_cf, pa_cf, batch, do.variable)
    assert logs_soft["seg"] < 1e-5 < logs_hard["seg"]
    assert "reg" in logs_soft  # sex is a subject-level variable: regressor term present
    # "regressor": the regressor's untouched terms read x as with True, the area terms keep pa*.
    reg_only = build_objective("seg", info, cfg(soft_labels="regressor"), eps=1e3, segmentor=seg, regressor=reg)
    _, logs_reg_only = reg_only.guide_loss(x_cf, pa_cf, batch, do.variable)
    assert logs_reg_only["seg"] == pytest.approx(logs_hard["seg"])
    assert logs_reg_only["reg"] == pytest.approx(logs_soft["reg"])
    assert logs_reg_only["reg"] < logs_hard["reg"]


class IdentityGenerator(nn.Module):
    spatial_dims = 2

    def counterfactual(self, x, pa, pa_cf, particles=1):
        return x, None


def test_objective_validation(setup):
    info, _, seg, _ = setup
    with pytest.raises(ConfigError, match="needs a trained regressor"):
        build_objective("reg", info, cfg(), eps=1.0, segmentor=seg)
    with pytest.raises(ConfigError, match="penalty"):
        build_objective("seg", info, cfg(penalty="l3"), eps=1.0, segmentor=seg)
    flat = DatasetInfo("flat", 2, (S, S), (1.0, 1.0), {1: "lung"}, [Variable("lung", "continuous", measure=Measure("lung"))], Normalisation((1.0,), (1.0,)))
    with pytest.raises(ConfigError, match="regions"):
        check_mode("pos-seg", flat)


def test_hvae_fused_elbo_counterfactual_matches_separate_passes():
    """One posterior pass (shared z draw) gives the same ELBO and x_cf as abduction + decode and
    a separate ELBO pass drawing the same noise; DSCM uses it and gradients reach the encoder."""
    from segcft.models.configs import HVAEConfig
    from segcft.models.hvae import HVAE

    torch.manual_seed(0)
    info = make_info()
    gen = HVAE(HVAEConfig(widths=(8, 8, 16), enc_blocks=(1, 1, 1), dec_blocks=(1, 1, 1), pool=(2, 8), z_dim=2,
                          z_max_res=8, bias_max_res=8, bottleneck=2, block="light"), (S, S), len(info.variables))
    batch = make_batch(info, b=4)
    x, pa = batch["image"], batch["parents"]
    pa_cf = pa.flip(0)
    torch.manual_seed(3)
    elbo, x_cf = gen.elbo_counterfactual(x, pa, pa_cf)
    torch.manual_seed(3)
    ref_cf, _ = gen.counterfactual(x, pa, pa_cf)
    torch.manual_seed(3)
    ref_elbo = gen.elbo(x, pa)
    assert torch.allclose(x_cf, ref_cf, atol=1e-5)
    assert torch.allclose(elbo["nelbo"], ref_elbo["nelbo"], atol=1e-5)
    assert not torch.allclose(x_cf, x, atol=1e-2)

    dscm = DSCM(info, LinearSCM(info), gen)
    do = permutation_intervention(info, pa, torch.Generator().manual_seed(0), ["lung"])
    x_cf, pa_cf, elbo = dscm.counterfactual_with_elbo(x, pa, do)
    (x_cf.mean() + elbo["loss"]).backward()
    assert gen.stem.weight.grad is not None and gen.stem.weight.grad.abs().sum() > 0
    assert torch.equal(pa_cf, dscm.parents_counterfactual(pa, do))


def test_damping_uses_the_constraints_moving_average(setup):
    """The damping coefficient follows a moving average of eps - nelbo (starting at 0), so one
    batch's deviation moves it by (1 - CONSTRAINT_AVERAGE) of the deviation only."""
    from segcft.objectives.base import CONSTRAINT_AVERAGE

    info, dscm, seg, _ = setup
    batch = make_batch(info)
    do = permutation_intervention(info, batch["parents"], torch.Generator().manual_seed(0), ["lung"])
    with torch.no_grad():
        nelbo = float(dscm.generator.elbo(batch["image"], batch["parents"])["loss"])
    obj = build_objective("seg", info, cfg(), eps=nelbo + 0.5, segmentor=seg)
    avgs = []
    for _ in range(3):
        out = obj(dscm, batch, intervention=do)
        avgs.append(out["constraint_avg"])
    gap = out["constraint"]
    expected = [gap * (1 - CONSTRAINT_AVERAGE ** (i + 1)) for i in range(3)]
    assert avgs == pytest.approx(expected, rel=1e-4)
    obj.eval()
    before = float(obj.constraint_avg)
    assert obj(dscm, batch, intervention=do)["constraint_avg"] == pytest.approx(before)  # frozen outside training
    # a batch whose nelbo is not finite (the stepper skips it) leaves the average as it was
    obj.train()
    assert float(obj._average_constraint(torch.tensor(float("nan")))) == pytest.approx(before)
    assert float(obj._average_constraint(torch.tensor(float("inf")))) == pytest.approx(before)
    after = float(obj._average_constraint(torch.tensor(1.0)))
    assert after == pytest.approx(CONSTRAINT_AVERAGE * before + (1 - CONSTRAINT_AVERAGE), rel=1e-6)
    # a finite outlier (a batch whose nelbo blew up) enters clipped to -max(eps, 1), so the damping
    # coefficient stays the size of eps instead of making every later gradient overflow
    bound = max(obj.eps, 1.0)
    huge = float(obj._average_constraint(torch.tensor(-4.0e7)))
    assert huge == pytest.approx(CONSTRAINT_AVERAGE * after - (1 - CONSTRAINT_AVERAGE) * bound, rel=1e-6)
    for _ in range(5):
        worst = float(obj._average_constraint(torch.tensor(-1.0e30)))
    assert -bound <= worst < huge


def test_lambda_gradient_is_the_constraint_clipped(setup):
    """d loss / d lambda = nelbo - eps for an ordinary batch, and at most max(|eps|, 1) for a batch
    whose nelbo exploded (it would otherwise freeze lambda's Adam); the generator's gradient and
    the loss value are those of guide - (lambda - d avg) (eps - nelbo) either way."""
    info, dscm, seg, _ = setup
    batch = make_batch(info)
    do = permutation_intervention(info, batch["parents"], torch.Generator().manual_seed(0), ["lung"])
    with torch.no_grad():
        nelbo = float(dscm.generator.elbo(batch["image"], batch["parents"])["loss"])
    for eps, clipped in ((nelbo + 0.5, False), (nelbo - 50.0 * max(nelbo, 1.0), True)):
        obj = build_objective("seg", info, cfg(), eps=eps, segmentor=seg)
        with torch.no_grad():
            obj.lmbda.fill_(0.7)
        torch.manual_seed(3)
        out = obj(dscm, batch, intervention=do)
        dscm.generator.zero_grad()
        out["loss"].backward()
        gap = out["constraint"]
        expected = -max(-max(abs(eps), 1.0), min(gap, max(abs(eps), 1.0)))
        assert float(obj.lmbda.grad) == pytest.approx(expected, rel=1e-5)
        assert (gap < -max(abs(eps), 1.0)) == clipped
        coeff = 0.7 - obj.cfg.damping * out["constraint_avg"]
        assert float(out["loss"].detach()) == pytest.approx(out["guide"] - coeff * gap, rel=1e-5, abs=1e-5)
        grads = [p.grad.clone() for p in dscm.generator.parameters() if p.grad is not None]
        # the same batch through the unclipped Lagrangian gives the generator the same gradient
        obj2 = build_objective("seg", info, cfg(), eps=eps, segmentor=seg)
        obj2.constraint_avg.copy_(torch.tensor(out["constraint_avg"]))
        torch.manual_seed(3)
        x_cf, pa_cf, elbo = dscm.counterfactual_with_elbo(batch["image"], batch["parents"], do)
        guide, _ = obj2.guide_loss(x_cf, pa_cf, batch, do.variable)
        ref = guide - coeff * (eps - elbo["loss"].float())
        dscm.generator.zero_grad()
        ref.backward()
        ref_grads = [p.grad for p in dscm.generator.parameters() if p.grad is not None]
        assert len(grads) == len(ref_grads) > 0
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class ScaledRegressor(nn.Module):
    """Predicts mean(x) + 0.1 * parents for every variable, with a chosen predicted scale."""

    spatial_dims = 2

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.scale = scale

    def forward(self, x, parents=None):
        loc = self.w * x.flatten(1).mean(1, keepdim=True).expand(-1, 5) + 0.1 * (0 if parents is None else parents)
        return {"loc": loc, "scale": torch.full_like(loc, self.scale)}

    def nll(self, x, targets):  # not used by the objective: it scores the predicted mean
        raise AssertionError("Reg-CFT must not score the regressor's likelihood")


def test_reg_cft_is_l1_of_the_predicted_mean_whatever_the_scale(setup):
    """Reg-CFT's regressor term is the area terms' penalty (L1) of the predicted mean's error in
    normalised units (Bernoulli cross-entropy for binary variables), conditioned on pa_cf: it
    does not depend on the predicted scale, as a Gaussian NLL weighted by 1/scale^2 would."""
    info, _, _, _ = setup
    batch = make_batch(info)
    x_cf, pa_cf = batch["image"] * 0.5, batch["parents"].clone()
    pa_cf[:, 1:] += 0.3  # continuous ones; sex stays 0/1
    values = []
    for scale in (0.05, 5.0):
        reg = ScaledRegressor(scale)
        obj = build_objective("reg", info, cfg(), eps=1.0, regressor=reg)
        loss, logs = obj.guide_loss(x_cf, pa_cf, batch, "age")
        values.append(logs["reg"])
    loc = x_cf.flatten(1).mean(1, keepdim=True).expand(-1, 5) + 0.1 * pa_cf
    expected = (loc[:, 1:] - pa_cf[:, 1:]).abs().sum(1) + nn.functional.binary_cross_entropy_with_logits(
        loc[:, 0], pa_cf[:, 0], reduction="none"
    )
    assert values[0] == pytest.approx(values[1]) == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(loss) == pytest.approx(values[1] * cfg().reg_weight, rel=1e-5)


class SharpSegmentor(nn.Module):
    """Exact masks from intensity (logits of +-50): lung where x > 0.5, else background."""

    classes = ("background", "lung", "heart")
    spatial_dims = 2

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(100.0))

    def forward(self, x):
        lung = self.gain * (x - 0.5)
        return torch.cat([-lung, lung, torch.full_like(x, -100.0)], dim=1)


def _locality_setup(info, weight: float, radius: int = 1, band: bool = False, interior: float = 0.0):
    from segcft.objectives.configs import SegSettings
    from segcft.objectives.guided import build_seg
    from segcft.objectives.base import ObjectiveContext

    seg = SharpSegmentor()
    ctx = ObjectiveContext("seg", info, cfg(), 1.0, seg, None)
    settings = SegSettings(locality=weight, locality_radius=radius, locality_band=band, locality_interior=interior)
    return build_seg(settings, ctx), seg


def test_locality_penalty_zero_inside_the_mask_positive_outside_no_gradient_into_guide(setup):
    info = setup[0]
    x = torch.full((2, 1, S, S), -0.8)
    x[:, :, 4:8, 4:8] = 0.9  # the lung on x
    batch = {"image": x, "parents": make_batch(info, b=2)["parents"]}
    obj, seg = _locality_setup(info, weight=1.0, radius=1)
    inside = x.clone()
    inside[:, :, 5:7, 5:7] = 0.7  # changed only inside the lung (the guide still reads lung)
    inside[:, :, 8, 4:8] = -0.5  # and within the dilation (radius 1) of it
    inside.requires_grad_(True)
    _, logs = obj.guide_loss(inside, batch["parents"], batch, "lung")
    assert logs["locality"] == 0.0
    outside = x.clone()
    outside[:, :, 12:14, 12:14] = -0.4  # far from the lung on x and on x_cf
    outside.requires_grad_(True)
    loss, logs = obj.guide_loss(outside, batch["parents"], batch, "lung")
    assert logs["locality"] == pytest.approx(0.4 * 4 / (S * S - 36), rel=1e-4)
    loss.backward()
    assert seg.gain.grad is None  # frozen guide; the masks carry no gradient
    assert float(outside.grad[:, :, 12:14, 12:14].abs().min()) > 0
    # the locality gradient is |x_cf - x| only: none through the masks into x_cf where they are
    without, _ = _locality_setup(info, weight=0.0)
    x2 = outside.detach().clone().requires_grad_(True)
    without.guide_loss(x2, batch["parents"], batch, "lung")[0].backward()
    extra = outside.grad - x2.grad
    assert float(extra[:, :, 3:9, 3:9].abs().max()) == 0.0
    # a subject-level intervention may change the whole image: no locality term
    _, logs = obj.guide_loss(outside, batch["parents"], batch, "age")
    assert logs["locality"] == 0.0


def test_locality_band_holds_the_interior_and_frees_the_moving_boundary(setup):
    """With locality_band the structure's shared interior is penalised like the outside, while
    the band where the membership changes (and its dilation) stays free."""
    info = setup[0]
    x = torch.full((2, 1, S, S), -0.8)
    x[:, :, 3:10, 3:10] = 0.9  # the lung on x
    batch = {"image": x, "parents": make_batch(info, b=2)["parents"]}
    band, _ = _locality_setup(info, weight=1.0, radius=1, band=True)
    plain, _ = _locality_setup(info, weight=1.0, radius=1)
    grown = x.clone()
    grown[:, :, 10:12, 3:10] = 0.9  # the lung grows by two rows: the band moves
    _, logs = band.guide_loss(grown.clone().requires_grad_(True), batch["parents"], batch, "lung")
    assert logs["locality"] == 0.0
    interior = grown.clone()
    interior[:, :, 5:7, 5:7] = 0.6  # still lung to the guide, but deep inside the shared part
    _, logs_band = band.guide_loss(interior.clone().requires_grad_(True), batch["parents"], batch, "lung")
    _, logs_plain = plain.guide_loss(interior.clone().requires_grad_(True), batch["parents"], batch, "lung")
    assert logs_plain["locality"] == 0.0
    assert logs_band["locality"] > 0.0


def test_locality_interior_is_a_mean_over_the_shared_interior_alone(setup):
    """locality_interior prices |x_cf - x| over the eroded intersection of the guide masks on x
    and x_cf, normalised by the interior's own size: a change deep inside the structure costs
    its share of the interior, however large the outside; the moving band and the outside cost
    nothing in this term."""
    info = setup[0]
    x = torch.full((2, 1, S, S), -0.8)
    x[:, :, 3:10, 3:10] = 0.9  # the lung on x (7 x 7)
    batch = {"image": x, "parents": make_batch(info, b=2)["parents"]}
    obj, seg = _locality_setup(info, weight=0.0, radius=1, interior=1.0)
    grown = x.clone()
    grown[:, :, 10:12, 3:10] = 0.9  # the band moves
    grown[:, :, 14:16, 14:16] = -0.5  # and the outside changes
    _, logs = obj.guide_loss(grown.clone().requires_grad_(True), batch["parents"], batch, "lung")
    assert logs["locality_interior"] == 0.0 and "locality" not in logs
    inner = grown.clone()
    inner[:, :, 5:7, 5:7] = 0.6  # 4 pixels changed by 0.3, inside the 5 x 5 eroded intersection
    x_cf = inner.clone().requires_grad_(True)
    loss, logs = obj.guide_loss(x_cf, batch["parents"], batch, "lung")
    assert logs["locality_interior"] == pytest.approx(0.3 * 4 / 25, rel=1e-4)
    loss.backward()
    assert seg.gain.grad is None
    assert float(x_cf.grad[:, :, 5:7, 5:7].abs().min()) > 0
    # a subject-level intervention adds nothing
    _, logs = obj.guide_loss(inner.clone().requires_grad_(True), batch["parents"], batch, "age")
    assert logs["locality_interior"] == 0.0


def test_the_guide_measures_the_factual_batch_once_a_step(setup):
    """Soft area targets and the locality masks both need the guide's reading of x: one forward
    pass of the guide on x and one on x_cf per step, whichever of the two are on, and the loss
    the same as with a separate pass for each."""
    from segcft.objectives.base import ObjectiveContext
    from segcft.objectives.configs import SegSettings
    from segcft.objectives.guided import build_seg

    info = setup[0]
    x = torch.full((2, 1, S, S), -0.8)
    x[:, :, 4:8, 4:8] = 0.9
    batch = {"image": x, "parents": make_batch(info, b=2)["parents"]}
    x_cf = x.clone()
    x_cf[:, :, 8:10, 4:8] = 0.9  # the lung grows
    x_cf[:, :, 12:14, 12:14] = -0.4  # and something changes far from it
    for soft, locality in ((True, 1.0), (True, 0.0), (False, 1.0)):
        seg = SharpSegmentor()
        calls: list[int] = []
        seg.register_forward_hook(lambda *_: calls.append(1))
        settings = SegSettings(locality=locality)
        obj = build_seg(settings, ObjectiveContext("seg", info, cfg(soft_labels=soft), 1.0, seg, None))
        loss, logs = obj.guide_loss(x_cf.clone().requires_grad_(True), batch["parents"], batch, "lung")
        assert len(calls) == 2, (soft, locality)
        apart = SharpSegmentor()  # the same guide, its reading of x taken afresh by each part
        obj2 = build_seg(settings, ObjectiveContext("seg", info, cfg(soft_labels=soft), 1.0, apart, None))
        obj2._on_factual = lambda x, measured: obj2.segmentor(x).detach()  # type: ignore[method-assign]
        loss2, logs2 = obj2.guide_loss(x_cf.clone().requires_grad_(True), batch["parents"], batch, "lung")
        assert torch.equal(loss, loss2) and logs == logs2
        if locality:
            assert logs["locality"] > 0


def test_locality_settings_are_checked(setup):
    from segcft.objectives.configs import SegSettings
    from segcft.objectives.guided import GuidedObjective
    from segcft.objectives.area import area_terms
    from segcft.objectives.base import ObjectiveContext

    info = setup[0]
    ctx = ObjectiveContext("seg", info, cfg(), 1.0, SharpSegmentor(), None)
    with pytest.raises(ConfigError, match="locality"):
        GuidedObjective(ctx, area_terms(info, False), torch.zeros(5, dtype=torch.bool), SegSettings(locality=-1.0))
    with pytest.raises(ConfigError, match="locality_interior=-0.5"):
        GuidedObjective(
            ctx, area_terms(info, False), torch.zeros(5, dtype=torch.bool), SegSettings(locality_interior=-0.5)
        )


def test_shift_moves_images_and_label_maps_and_undoes_itself():
    from segcft.objectives.jitter import random_offsets, shift

    x = torch.randn(3, 2, 9, 10)
    offsets = torch.tensor([[1, -2], [0, 0], [-1, 2]])
    y = shift(x, offsets, 2)
    assert torch.equal(y[0, :, 2:7, 2:8], x[0, :, 3:8, 0:6])  # out[i] = x[i + offset]
    assert torch.equal(y[1], x[1])
    assert torch.equal(shift(y, -offsets, 2)[:, :, 2:-2, 2:-2], x[:, :, 2:-2, 2:-2])
    labels = torch.randint(0, 4, (3, 9, 10))
    moved = shift(labels, offsets, 2)
    assert moved.dtype == labels.dtype and torch.equal(moved[2, 1:9, 0:8], labels[2, 0:8, 2:10])
    torch.manual_seed(0)
    drawn = random_offsets(1000, 3, 2)
    assert int(drawn.min()) == -2 and int(drawn.max()) == 2 and abs(float(drawn.float().mean())) < 0.1
    assert not random_offsets(4, 2, 0).any()


def test_guide_jitter_measures_a_moved_copy_and_keeps_the_locality_frame(setup):
    """With guide_shift the area loss is the same for a translation-invariant target (the lung
    stays inside the image), gradients still reach x_cf, and the locality term, measured in
    x_cf's own frame, is unchanged; guide_noise changes the reading and is checked >= 0."""
    from segcft.objectives.area import area_terms
    from segcft.objectives.base import ObjectiveContext
    from segcft.objectives.configs import SegSettings
    from segcft.objectives.guided import GuidedObjective, build_seg

    info = setup[0]
    x = torch.full((4, 1, S, S), -0.8)
    x[:, :, 5:9, 5:9] = 0.9
    batch = {"image": x, "parents": make_batch(info, b=4)["parents"]}
    ctx = ObjectiveContext("seg", info, cfg(), 1.0, SharpSegmentor(), None)
    plain = build_seg(SegSettings(locality=1.0, locality_radius=1), ctx)
    jitter = build_seg(SegSettings(locality=1.0, locality_radius=1, guide_shift=3), ctx)
    noisy = build_seg(SegSettings(guide_noise=0.5), ctx)
    x_cf = x.clone()
    x_cf[:, :, 12:14, 12:14] = -0.4
    x_cf.requires_grad_(True)
    torch.manual_seed(1)
    loss_p, logs_p = plain.guide_loss(x_cf, batch["parents"], batch, "lung")
    loss_j, logs_j = jitter.guide_loss(x_cf, batch["parents"], batch, "lung")
    assert logs_j["seg"] == pytest.approx(logs_p["seg"], rel=1e-5)
    assert logs_j["locality"] == pytest.approx(logs_p["locality"], rel=1e-5)
    loss_j.backward()
    assert float(x_cf.grad.abs().sum()) > 0
    _, logs_n = noisy.guide_loss(x_cf.detach(), batch["parents"], batch, "lung")
    assert logs_n["seg"] != pytest.approx(logs_p["seg"], rel=1e-3)
    with pytest.raises(ConfigError, match="guide_shift"):
        GuidedObjective(ctx, area_terms(info, False), torch.zeros(5, dtype=torch.bool), SegSettings(guide_shift=-1))


@pytest.mark.timeout(180)
def test_fine_tuning_smoke_with_locality_ema_and_its_own_clip(tmp_path, capsys):
    """A smoke run fine-tuning seg with the locality penalty on and an EMA of the weights trains
    and logs the penalty. The cft stage clips at its own cft.grad_clip (here tiny: every update
    is clipped) while the generator stage keeps its 350: metrics.csv's clipped_frac says so. A
    stage that skips most of its updates (here the regressor, with a tiny grad_skip) says so."""
    import csv

    from segcft.checkpoint import load_checkpoint
    from segcft.config import load_run_config
    from segcft.train.pipeline import run_training

    cfg = load_run_config(
        None,
        "smoke",
        [
            "cft.modes=[none,seg]",
            "cft.objectives.seg.locality=1.0",
            "cft.ema=0.5",
            "cft.grad_clip=1e-6",
            "cft.steps=4",
            "evaluate.n=4",
            "train.regressor.grad_skip=1e-12",
        ],
    )
    assert cfg.cft.objectives["seg"].locality == 1.0
    run_training(cfg, tmp_path)
    printed = capsys.readouterr().out
    assert "warning: [regressor] skipped" in printed and "train.regressor.grad_skip 1e-12" in printed, printed
    assert "warning: [cft-seg] skipped" not in printed
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cft = [r for r in rows if r["stage"] == "cft-seg"]
    gen = [r for r in rows if r["stage"] == "generator" and r.get("clipped_frac")]
    assert cft and all(float(r["clipped_frac"]) == 1.0 for r in cft), cft
    assert all(float(r["skipped_frac"]) == 0.0 for r in cft)
    assert gen and all(float(r["clipped_frac"]) < 1.0 for r in gen)
    locality = [float(r["locality"]) for r in cft if r.get("locality")]
    assert locality and all(v >= 0.0 and v == v for v in locality)
    base = load_checkpoint(tmp_path / "checkpoints" / "generator.pt")["model"]
    tuned = load_checkpoint(tmp_path / "checkpoints" / "cft-seg.pt")["model"]
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert all(bool(torch.isfinite(v).all()) for v in tuned.values() if v.is_floating_point())
