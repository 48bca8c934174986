"""The training pipeline: smoke runs in 2D and 3D, resume after SIGKILL, DDP equivalence and
the one-line validation errors."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from segcft.checkpoint import load_checkpoint
from segcft.config import load_run_config
from segcft.errors import ConfigError, UserError
from segcft.train import load_run, run_training

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def smoke(*overrides: str, components: dict[str, str] | None = None):
    return load_run_config(None, "smoke", list(overrides), components=components)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.timeout(120)
def test_smoke_2d_end_to_end(tmp_path, capsys):
    cfg = smoke("cft.modes=[none,reg,seg]", "evaluate.n=4")
    report = run_training(cfg, tmp_path)
    out = capsys.readouterr().out
    assert report == tmp_path / "report.md" and report.is_file()
    assert "soft areas in physical units (mm^2)" in report.read_text()
    assert out.strip().splitlines()[-1] == f"report: {report}"
    assert "do(" in out  # headline numbers precede the report line
    # the time estimate: one line, once the first image stage (the guide segmentor) timed its steps
    estimates = [line for line in out.splitlines() if line.startswith("estimated total time: ~")]
    assert len(estimates) == 1 and re.match(r"estimated total time: ~\d+ min \(from segmentor ", estimates[0])
    assert out.index(estimates[0]) < out.index("[segmentor] finished")
    for stage in ("mechanisms", "segmentor", "eval_segmentor", "regressor", "generator", "cft-reg", "cft-seg"):
        assert (tmp_path / "checkpoints" / f"{stage}.pt").is_file(), stage
    assert not list((tmp_path / "checkpoints").glob("*.last.pt"))
    assert (tmp_path / "figures" / "curves_generator.png").is_file()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["stage", "step"] and "loss" in header and "lambda" in header
    run = load_run(tmp_path)
    assert set(run.generators) == {"none", "reg", "seg"}
    assert run.eps == pytest.approx(float(load_checkpoint(tmp_path / "checkpoints" / "generator.pt")["eps"]))
    base, tuned = _weights(tmp_path / "checkpoints" / "generator.pt"), _weights(tmp_path / "checkpoints" / "cft-seg.pt")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)  # fine-tuning moved the generator
    # A second call finds every checkpoint and trains nothing.
    run_training(cfg, tmp_path)
    assert "skipped" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_smoke_3d_pos_seg(tmp_path):
    cfg = smoke(
        "dataset.depth=16", "dataset.side=8", "dataset.train_size=32", "dataset.val_size=8", "dataset.test_size=8",
        "generator.preset=3d", "cft.modes=[none,pos-seg]", "evaluate.n=2",
        components={"dataset": "ccta-phantom"},
    )
    report = run_training(cfg, tmp_path)
    assert report.is_file()
    text = report.read_text()
    assert "soft volumes in physical units (mm^3)" in text and "soft areas" not in text
    run = load_run(tmp_path)
    assert run.info.spatial_dims == 3 and set(run.generators) == {"none", "pos-seg"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dataset", ["cxr-phantom", "ccta-phantom"])
def test_segmentor_trains_channels_last_to_the_weights_of_a_contiguous_run(tmp_path, monkeypatch, dataset):
    """The segmentor stages train in NHWC / NDHWC layout (faster convolutions, the same maths): the
    weights match a run in the default layout to float tolerance and are saved contiguous."""
    import segcft.train.loop as loop

    overrides = ["train.segmentor.steps=12", "train.segmentor.gate_dice=0", "train.segmentor.gate_mape=0"]
    if dataset == "ccta-phantom":
        overrides += ["dataset.depth=16", "dataset.side=8", "dataset.train_size=32", "dataset.val_size=8"]
    cfg = smoke(*overrides, components={"dataset": dataset})
    layout = torch.channels_last_3d if dataset == "ccta-phantom" else torch.channels_last
    seen: list[bool] = []
    step = loop._step

    def recording_step(ctx, ts, wrapped, batch, after_step):
        # a weight with several input channels and a 3-wide kernel: one channel is dense in both layouts
        weight = next(p for p in ts.model.parameters() if p.dim() == batch["image"].dim() and min(p.shape[1:]) > 1)
        seen.append(weight.is_contiguous(memory_format=layout))
        return step(ctx, ts, wrapped, batch, after_step)

    monkeypatch.setattr(loop, "_step", recording_step)
    run_training(cfg, tmp_path / "nhwc", only=["segmentor"])
    assert seen and all(seen), "the segmentor should train channels-last"
    monkeypatch.setattr(loop, "_LAYOUTS", {})
    seen.clear()
    run_training(cfg, tmp_path / "default", only=["segmentor"])
    assert seen and not any(seen)
    a = _weights(tmp_path / "nhwc" / "checkpoints" / "segmentor.pt")
    assert all(t.is_contiguous() for t in a.values())
    # Compared by their logits: the conv biases in front of instance norm get no true gradient, so
    # Adam turns their rounding noise into steps of its learning rate, which the norm then removes.
    from segcft.components import build_component, build_dataset

    info = build_dataset(cfg, "val").info

    def trained(name: str) -> torch.nn.Module:
        seg = build_component("segmentor", cfg.segmentor, info)
        seg.load_state_dict(_weights(tmp_path / name / "checkpoints" / "segmentor.pt"))
        return seg.eval()

    nhwc, default = trained("nhwc"), trained("default")
    x = torch.rand(2, 1, *((16, 8, 8) if dataset == "ccta-phantom" else (32, 32))) * 2 - 1
    torch.testing.assert_close(nhwc(x), default(x), rtol=1e-3, atol=1e-3)


@pytest.mark.timeout(60)
def test_cosine_lr_decay_reaches_zero_at_the_last_step(tmp_path):
    cfg = smoke(
        "train.segmentor.steps=12", "train.segmentor.warmup=0", "train.segmentor.log_every=4",
        "train.segmentor.lr_decay=cosine", "train.segmentor.gate_dice=0", "train.segmentor.gate_mape=0",
    )
    run_training(cfg, tmp_path, only=["segmentor"])
    rows = [line.split(",") for line in (tmp_path / "metrics.csv").read_text().splitlines()]
    lr = [float(r[rows[0].index("lr")]) for r in rows[1:] if r[0] == "segmentor"]
    assert lr == pytest.approx([cfg.train.segmentor.lr * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in (4, 8, 12)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from segcft.config import load_run_config
    from segcft.train import run_training
    cfg = load_run_config(None, "smoke", sys.argv[3:])
    run_training(cfg, sys.argv[1], only=sys.argv[2].split(","), resume="auto")
    """
)


def _launch(run_dir: Path, only: str, overrides: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(run_dir), only, *overrides],
        env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.timeout(120)
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    overrides = ["train.segmentor.steps=60", "train.segmentor.checkpoint_every=5", "train.segmentor.log_every=5"]
    killed = tmp_path / "killed"
    proc = _launch(killed, "segmentor", overrides)
    last = killed / "checkpoints" / "segmentor.last.pt"
    deadline = time.time() + 90
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "segmentor.pt").is_file()
    cfg = smoke(*overrides)
    run_training(cfg, killed, only=["segmentor"], resume="auto")
    straight = tmp_path / "straight"
    run_training(cfg, straight, only=["segmentor"])
    a, b = _weights(killed / "checkpoints" / "segmentor.pt"), _weights(straight / "checkpoints" / "segmentor.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.timeout(150)
def test_ddp_two_gloo_ranks_match_one_process(tmp_path):
    overrides = ["train.segmentor.steps=3", "train.segmentor.batch_size=8", "train.segmentor.warmup=1",
                 "device=cpu"]
    port = str(_free_port())
    procs = [
        _launch(tmp_path / "ddp", "segmentor", overrides, {
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
        })
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    run_training(smoke(*overrides), tmp_path / "single", only=["segmentor"])
    a = _weights(tmp_path / "ddp" / "checkpoints" / "segmentor.pt")
    b = _weights(tmp_path / "single" / "checkpoints" / "segmentor.pt")
    moved = _weights_init(overrides)
    assert any(not torch.allclose(b[k], moved[k]) for k in b)  # the runs trained
    # Conv biases right before instance normalisation have a zero gradient up to rounding, which
    # Adam turns into +-lr steps of arbitrary sign: they are excluded. Every other tensor matches
    # to within 5 % of how far the weights moved: the ranks sum their gradients in another order,
    # and Adam's normalisation amplifies that rounding (up to 1.3 % of the move measured on an
    # Intel Xeon), while ranks that did not average their gradients, like a run on half the
    # batch, differ by 15-170 % of it in every convolution weight.
    compared = [k for k in a if not k.endswith("conv.bias")]
    assert len(compared) >= 14
    for k in compared:
        move = float((b[k] - moved[k]).abs().max())
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.05 * move, msg=k)


def _weights_init(overrides: list[str]) -> dict[str, torch.Tensor]:
    from segcft.components import build_component as _build_component

    cfg = smoke(*overrides)
    from segcft.plugins import get_registry

    info = get_registry().get("dataset", cfg.dataset.name).load()(cfg.dataset.params, "train").info
    torch.manual_seed(cfg.seed)
    return _build_component("segmentor", cfg.segmentor, info).state_dict()


def test_validation_errors_are_one_line_before_training(tmp_path):
    cfg = smoke()
    cfg.generator.name = "nope"
    with pytest.raises(UserError, match="unknown generator 'nope'"):
        run_training(cfg, tmp_path / "a")
    with pytest.raises(UserError, match="'pos-seg' needs a dataset with regions"):
        run_training(smoke("cft.modes=[none,pos-seg]"), tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(UserError, match="unknown stage"):
        run_training(smoke(), tmp_path / "c", only=["generatr"])
    with pytest.raises(UserError, match="--resume"):
        run_training(smoke(), tmp_path / "d", resume="sometimes")


def test_segmentor_intensity_augmentation_scales_and_shifts_each_image():
    from segcft.config import IntensityAugmentConfig
    from segcft.train.losses import SegmentorLoss

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2, *x.shape[2:], requires_grad=True)

    x = torch.linspace(-0.9, 0.9, 2 * 16).view(2, 1, 4, 4).repeat(3, 1, 1, 1)
    mask = torch.zeros(6, 4, 4, dtype=torch.int64)
    rng = torch.Generator().manual_seed(0)
    SegmentorLoss(Probe(), IntensityAugmentConfig(shift=0.1, scale=0.2), rng)({"image": x, "mask": mask})
    y = seen[-1]
    # per image y + 1 = a (x + 1) + b: recover a and b from two pixels and check the bounds
    a = (y[:, 0, 0, 1] - y[:, 0, 0, 0]) / (x[:, 0, 0, 1] - x[:, 0, 0, 0])
    b = y[:, 0, 0, 0] + 1 - a * (x[:, 0, 0, 0] + 1)
    assert ((a - 1).abs() <= 0.2 + 1e-5).all() and (b.abs() <= 0.1 + 1e-5).all()
    assert len(set(a.round(decimals=4).tolist())) == 6  # one draw per image
    torch.testing.assert_close(y, (a.view(-1, 1, 1, 1) * (x + 1) - 1 + b.view(-1, 1, 1, 1)).clamp(-1, 1))
    # off: the images pass through untouched
    SegmentorLoss(Probe(), IntensityAugmentConfig(shift=0.0, scale=0.0), rng)({"image": x, "mask": mask})
    assert torch.equal(seen[-1], x)


def test_segmentor_intensity_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="segmentor_intensity"):
        load_run_config(preset="smoke", overrides=["train.segmentor_intensity.scale=1.5"])


@pytest.mark.parametrize(("overrides", "amp"), [([], False), (["cpu_bf16=true"], True)])
def test_cpu_bf16_turns_cpu_autocast_on_only_when_asked(tmp_path, overrides, amp):
    from segcft.distributed import Dist
    from segcft.run import RunDir
    from segcft.train.context import StageContext

    cfg = load_run_config(None, "smoke", overrides)
    ctx = StageContext(cfg, RunDir(tmp_path / "run"), Dist(), torch.device("cpu"), False)
    assert ctx.amp is amp
