"""benchmarks/step.py --volumes: the 3D fine-tuning step's profile accounts for the whole step
and puts each guide's time under its own label."""

from __future__ import annotations


import pytest
import torch


def test_3d_step_profile_groups_each_guide_and_sum_to_the_step(monkeypatch, load_benchmark):
    step = load_benchmark("step")
    import segcft.ops as ops

    monkeypatch.setattr(ops, "area_loss", ops.area_loss)  # the benchmark labels it in place
    torch.set_num_threads(1)
    rows = {r["spec"]: r for r in step.bench_3d("32x16x16", ["reg", "pos-seg"], batch=1, reps=1, profile=True)}
    reg, pos = rows["reg"], rows["pos-seg"]
    assert reg["ms segmentor fwd"] == 0 and reg["ms area loss fwd+bwd"] == 0 and reg["ms regressor bwd"] > 0
    for g in ("generator fwd", "generator bwd", "segmentor fwd", "segmentor bwd", "area loss fwd+bwd"):
        assert pos[f"ms {g}"] > 0, g
    for r in (reg, pos):
        # other is the step minus the labelled groups: never negative (no time counted twice),
        # and small (the labels cover the networks, the loss and the optimiser).
        assert 0 <= r["ms other"] <= 0.2 * r["ms total"]
        assert r["first_loss"] == r["first_loss"] and r["step_cpu_s"] > 0


def test_gpu_profile_sums_device_events_per_kernel(load_benchmark):
    """_device_ms keeps only device (CUDA) kernel events, not the step's labels mirrored onto the
    GPU timeline, sums each name's durations and lists the costliest first: what the GPU
    profile's busy time and top kernels are made of."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    step = load_benchmark("step")

    def event(name, device, us, label=False):
        return SimpleNamespace(
            name=name, device_type=device, is_user_annotation=label, time_range=SimpleNamespace(elapsed_us=lambda: us)
        )

    events = [
        event("conv", DeviceType.CUDA, 300.0),
        event("aten::conv3d", DeviceType.CPU, 900.0),
        event("gelu", DeviceType.CUDA, 500.0),
        event("conv", DeviceType.CUDA, 400.0),
        event("generator", DeviceType.CUDA, 1200.0, label=True),
    ]
    assert step._device_ms(events) == pytest.approx({"conv": 0.7, "gelu": 0.5})
    assert list(step._device_ms(events)) == ["conv", "gelu"]
