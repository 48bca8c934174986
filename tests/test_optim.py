"""Training support: warm-up schedule, EMA maths, clipping and skipping of bad updates."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from segcft.optim import EMA, FlatAdamW, GuardedStepper, build_optimizer, cosine_factor, warmup_factor


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_warmup_schedule() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    model = _linear()
    optimizer, scheduler = build_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1, warmup=4)
    assert optimizer.defaults["betas"] == (0.9, 0.9) and optimizer.defaults["weight_decay"] == 0.1
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


def test_cosine_decay_times_the_warmup() -> None:
    assert cosine_factor(0, 0) == 1.0 and cosine_factor(5, 0) == 1.0
    assert [cosine_factor(s, 4) for s in (0, 2, 4, 6)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    model = _linear()
    optimizer, scheduler = build_optimizer(model.parameters(), lr=1e-2, warmup=2, decay_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * min(1.0, (k + 1) / 2) * 0.5 * (1 + math.cos(math.pi * min(k, 4) / 4)) for k in range(6)]
    assert lrs == pytest.approx(expected) and lrs[4] == lrs[5] == 0.0


def test_ema_maths() -> None:
    model = _linear()
    ema = EMA(model, rate=0.6)
    expected = model.weight.detach().clone()
    decays = []
    for _k in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        d = ema.decay()
        decays.append(d)
        ema.update(model)
        expected = d * expected + (1 - d) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    # 1 - 1/(1+k) for k = 0, 1, 2, ... capped at the rate.
    assert decays == pytest.approx([0.0, 0.5, 0.6, 0.6, 0.6])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trip() -> None:
    model = _linear()
    ema = EMA(model, rate=0.9)
    ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(_linear(seed=1), rate=0.5)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.updates == 1 and other.rate == 0.9
    torch.testing.assert_close(other.module.weight, ema.module.weight)


def _stepper(net: nn.Module, **kwargs) -> GuardedStepper:
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    return GuardedStepper(net.parameters(), optimizer, **kwargs)


def test_skip_on_nan() -> None:
    model = _linear()
    ema = EMA(model)
    stepper = _stepper(model, grad_clip=1.0, grad_skip=10.0, ema=ema, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()
    loss.backward()
    result = stepper.step(loss)
    assert result.skipped and result.reason == "nonfinite" and math.isnan(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert (
        stepper.counts == {"applied": 0, "skipped_nonfinite": 1, "skipped_norm": 0, "clipped": 0} and ema.updates == 0
    )


def test_skip_on_huge_norm_and_clip_otherwise() -> None:
    model = _linear()
    stepper = _stepper(model, grad_clip=1.0, grad_skip=50.0)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.full((1, 3), 100.0)).sum()).backward()
    result = stepper.step()
    assert result.skipped and result.reason == "norm" and result.grad_norm >= 50.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    (model(torch.full((1, 3), 2.0)).sum()).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    norm = torch.sqrt(sum(g.square().sum() for g in grads)).item()
    result = stepper.step()
    assert not result.skipped and result.grad_norm == pytest.approx(norm) and norm > 1.0
    for b, p, g in zip(before, model.parameters(), grads):  # SGD lr 1: the step is the clipped gradient
        torch.testing.assert_close(b - p.detach(), g / norm, rtol=1e-4, atol=1e-6)
    assert stepper.counts == {"applied": 1, "skipped_nonfinite": 0, "skipped_norm": 1, "clipped": 1}  # norm > clip


def test_skip_disabled_and_schedule_steps_only_on_applied_updates() -> None:
    model = _linear()
    optimizer, scheduler = build_optimizer(model.parameters(), lr=1.0, warmup=10)
    stepper = GuardedStepper(model.parameters(), optimizer, scheduler, grad_clip=0.0, grad_skip=0.0)
    (model(torch.full((1, 3), 1e6)).sum()).backward()
    assert not stepper.step().skipped
    loss = torch.tensor(float("inf"))
    (model(torch.ones(1, 3)).sum()).backward()
    assert stepper.step(loss).reason == "nonfinite"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    state = stepper.state_dict()
    fresh = GuardedStepper(model.parameters(), optimizer)
    fresh.load_state_dict(state)
    assert fresh.counts == {"applied": 1, "skipped_nonfinite": 1, "skipped_norm": 0, "clipped": 0}  # clip off


class _Net(nn.Module):
    """Convolutions in channels-last (strided parameters), a linear head and a parameter that
    only some steps use."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)
        self.late = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor, use_late: bool = False) -> torch.Tensor:
        out = self.head(self.conv(x).mean((2, 3))).square().mean()
        return out + self.late.square().sum() if use_late else out


def _pair(clip: float) -> list[tuple[nn.Module, GuardedStepper, EMA]]:
    """The same net under torch's AdamW and under FlatAdamW, each with clipping and an EMA."""
    out = []
    for flat in (False, True):
        net = _Net().to(memory_format=torch.channels_last)
        if flat:
            opt, _ = build_optimizer(net.parameters(), lr=1e-2, weight_decay=0.1)
        else:
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.9), foreach=True)
        ema = EMA(net, rate=0.8)
        out.append((net, GuardedStepper(net.parameters(), opt, grad_clip=clip, ema=ema, model=net), ema))
    return out


def _train(runs: list[tuple[nn.Module, GuardedStepper, EMA]], steps: range, late_from: int = 10**9) -> None:
    for i in steps:
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)).contiguous(
            memory_format=torch.channels_last
        )
        for net, stepper, _ in runs:
            loss = net(x, use_late=i >= late_from)
            loss.backward()
            stepper.step(loss)


def _assert_same(runs: list[tuple[nn.Module, GuardedStepper, EMA]]) -> None:
    (a, _, ea), (b, _, eb) = runs
    for p, q in zip(
        list(a.parameters()) + list(ea.module.parameters()), list(b.parameters()) + list(eb.module.parameters())
    ):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_flat_adamw_is_torch_adamw() -> None:
    """Same updates, clipping and EMA as torch's AdamW over per-parameter tensors; a parameter
    without a gradient is left alone until it gets one, then updated as AdamW would."""
    runs = _pair(clip=0.05)
    late = runs[1][0].late.detach().clone()
    _train(runs, range(4))
    assert runs[0][1].counts["clipped"] >= 1  # the clip was exercised
    flat = runs[1][1].optimizer
    assert isinstance(flat, FlatAdamW) and flat.flat_params is not None
    assert runs[1][0].conv.weight.is_contiguous(memory_format=torch.channels_last)  # layout kept
    assert len(flat.members) == 4 and torch.equal(runs[1][0].late, late)
    _assert_same(runs)
    _train(runs, range(4, 8), late_from=5)
    assert not torch.equal(runs[1][0].late, late)
    _assert_same(runs)


def test_flat_adamw_state_moves_between_classes() -> None:
    """A saved FlatAdamW state continues under torch's AdamW and the other way round."""
    runs = _pair(clip=0.0)
    _train(runs, range(3))
    flat = runs[1][1].optimizer
    assert float(flat.state_dict()["state"][1]["step"]) == 3.0
    _train(runs, range(3, 4))
    assert float(flat.state_dict()["state"][1]["step"]) == 4.0  # saving does not detach the count
    for src, dst in ((1, 0), (0, 1)):
        buf = io.BytesIO()
        torch.save(runs[src][1].optimizer.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        keys = set(runs[0][1].optimizer.state_dict()["param_groups"][0]) - {"initial_lr"}  # the schedule's
        assert set(state["param_groups"][0]) - {"initial_lr"} == keys
        with torch.no_grad():
            for p, q in zip(runs[dst][0].parameters(), runs[src][0].parameters()):
                p.copy_(q)
        runs[dst][1].optimizer.load_state_dict(state)
        _train(runs, range(4 + 2 * src, 6 + 2 * src))
        _assert_same(runs)


def test_flat_adamw_rebuilds_dropped_grads_and_refuses_moved_parameters() -> None:
    runs = _pair(clip=0.0)
    _train(runs, range(2))
    for net, _, _ in runs:
        net.zero_grad(set_to_none=True)  # drops the views of the flat gradient
    _train(runs, range(2, 4))
    _assert_same(runs)
    runs[1][0].to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # new conv weights
    with pytest.raises(RuntimeError, match="moved or replaced"):
        _train(runs[1:], range(4, 5))
