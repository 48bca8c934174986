"""Fine-tuning objectives as plugins: the built-ins through the registry, a third-party objective
fine-tuned end to end through ``segcft train``, and the errors a bad one gives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import segcft
from segcft import plugins
from segcft.checkpoint import load_checkpoint
from segcft.cli import cli
from segcft.components import build_dataset
from segcft.config import load_run_config
from segcft.errors import ConfigError
from segcft.objectives.base import CFTObjective, ObjectiveContext, build_objective
from segcft.objectives.modes import objective_guides, objective_index
from segcft.plugins import PluginError, PluginWarning
from segcft.train import load_run

torch.set_num_threads(1)

BUILTINS = ["none", "reg", "seg", "pos-seg"]
BUILT: list[tuple[Any, ObjectiveContext]] = []


@dataclass
class BrightConfig:
    weight: float = field(default=1.0, metadata={"help": "weight of the brightness term", "gt": 0})


class BrightObjective(CFTObjective):
    """Guidance towards brighter counterfactuals: -weight * mean(x_cf)."""

    def __init__(self, config: BrightConfig, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.weight = config.weight

    def guide_loss(self, x_cf, pa_cf, batch, intervened):
        loss = -self.weight * x_cf.float().mean()
        return loss, {"bright": float(loss.detach())}


def build_bright(config: BrightConfig, ctx: ObjectiveContext) -> BrightObjective:
    BUILT.append((config, ctx))
    return BrightObjective(config, ctx)


class BrightPlugin:
    @segcft.hookimpl
    def segcft_register_objectives(self, register):
        register(
            "bright",
            build_bright,
            config=BrightConfig,
            needs=("segmentor",),
            description="brighter counterfactuals (test)",
        )
        register("bright-regions", build_bright, config=BrightConfig, needs=("regions",))


@pytest.fixture(autouse=True)
def builtin_only(monkeypatch):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    monkeypatch.delenv("SEGCFT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    BUILT.clear()
    yield
    plugins.reset()


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="segcft")


def test_list_objectives_json_and_text():
    res = run("list", "objectives", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == BUILTINS
    by_name = {r["name"]: r for r in rows}
    assert by_name["pos-seg"]["needs"] == ["segmentor", "structures", "regions"]
    assert by_name["seg"]["uses"] == ["regressor"] and by_name["reg"]["needs"] == ["regressor"]
    assert all(r["plugin"] == plugins.BUILTIN_PLUGIN for r in rows)
    # none and reg have no settings of their own; seg and pos-seg have the optional locality penalty
    # and guide jitter, all off by default
    assert by_name["none"]["config"] == [] and by_name["reg"]["config"] == []
    for mode in ("seg", "pos-seg"):
        fields = {f["name"]: f["default"] for f in by_name[mode]["config"]}
        expected = {"locality": 0.0, "locality_radius": 2, "locality_band": False, "locality_interior": 0.0, "guide_shift": 0, "guide_noise": 0.0}
        assert fields == expected, by_name[mode]["config"]
    text = run("list", "objectives", "--verbose")
    assert text.exit_code == 0 and "needs segmentor, structures, regions; uses regressor if configured" in text.output


def test_builtin_seeds_follow_registration_order_and_plugins_come_after():
    assert [objective_index(m) for m in BUILTINS] == [0, 1, 2, 3]
    plugins.register_plugin(BrightPlugin(), "bright-plugin")
    assert objective_index("bright") == 4 and objective_index("bright-regions") == 5
    with pytest.raises(ConfigError, match="unknown fine-tuning mode 'nope'"):
        objective_index("nope")


def test_guides_follow_what_the_objective_declares():
    plugins.register_plugin(BrightPlugin(), "bright-plugin")
    cfg = load_run_config(preset="smoke")
    assert objective_guides("seg", cfg) == ["segmentor", "regressor"]
    assert objective_guides("reg", cfg) == ["regressor"]
    assert objective_guides("bright", cfg) == ["segmentor"]
    cfg.regressor.name = ""
    assert objective_guides("seg", cfg) == ["segmentor"]


@pytest.mark.timeout(300)
def test_plugin_objective_fine_tunes_end_to_end(tmp_path):
    plugins.register_plugin(BrightPlugin(), "bright-plugin")
    run_dir = tmp_path / "run"
    res = run(
        "train",
        "--preset",
        "smoke",
        "--cft",
        "none",
        "--cft",
        "bright",
        "--device",
        "cpu",
        "--set",
        "cft.objectives={bright: {weight: 2.5}}",
        "--set",
        "evaluate.n=2",
        "--run-dir",
        str(run_dir),
    )
    assert res.exit_code == 0, res.output
    config, ctx = BUILT[-1]
    assert config == BrightConfig(weight=2.5) and ctx.mode == "bright"
    assert ctx.segmentor is not None and ctx.regressor is None  # needs segmentor, uses no regressor
    assert not any(p.requires_grad for p in ctx.segmentor.parameters())
    final = load_checkpoint(run_dir / "checkpoints" / "cft-bright.pt")
    base = load_checkpoint(run_dir / "checkpoints" / "generator.pt")["model"]
    assert final["lambda"] >= 0.0
    assert any(not torch.equal(base[k], final["model"][k]) for k in base)  # fine-tuning moved the generator
    assert "bright" in (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(load_run(run_dir).generators) == {"none", "bright"}
    assert "objectives:\n    bright:\n      weight: 2.5" in (run_dir / "config.yaml").read_text()


def test_unknown_mode_and_bad_objective_settings_are_one_line():
    res = run("train", "--preset", "smoke", "--cft", "segg")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert (
        "cft.modes[0]: expected one of 'none', 'reg', 'seg', 'pos-seg', got 'segg'; did you mean 'seg'?" in res.output
    )
    plugins.register_plugin(BrightPlugin(), "bright-plugin")
    res = run("train", "--preset", "smoke", "--cft", "bright", "--set", "cft.objectives.bright.weight=-1")
    assert res.exit_code == 2 and "cft.objectives.bright.weight: expected a value > 0, got -1" in res.output
    res = run("train", "--preset", "smoke", "--set", "cft.objectives.nope.weight=1")
    assert res.exit_code == 2 and "cft.objectives.nope: unknown objective 'nope'" in res.output
    res = run("train", "--preset", "smoke", "--cft", "bright-regions")
    assert res.exit_code == 2
    assert "cft.modes: 'bright-regions' needs a dataset with regions; dataset 'cxr-phantom' has none" in res.output


class NotADataclass:
    weight = 1.0


class BadConfigPlugin:
    @segcft.hookimpl
    def segcft_register_objectives(self, register):
        register("bad-config", build_bright, config=NotADataclass)


class ClashPlugin:
    @segcft.hookimpl
    def segcft_register_objectives(self, register):
        register("seg", build_bright, config=BrightConfig)


class BadNeedsPlugin:
    @segcft.hookimpl
    def segcft_register_objectives(self, register):
        register("bad-needs", build_bright, config=BrightConfig, needs=("masks",))


@pytest.mark.parametrize(
    "plugin, message",
    [
        (BadConfigPlugin(), "registering objective 'bad-config': config= must be a dataclass type"),
        (ClashPlugin(), "objective name 'seg' is registered twice: by plugin 'segcft.builtin' and by plugin 'p'"),
        (BadNeedsPlugin(), "needs= takes 'segmentor', 'regressor', 'structures', 'regions', got 'masks'"),
    ],
)
def test_bad_plugin_objectives_are_clear_errors(plugin, message, monkeypatch):
    with pytest.warns(PluginWarning, match="plugin skipped"):
        _, registry = plugins.load_registry([("p", plugin)], entry_points=False)
    assert registry.ordered("objective") == BUILTINS
    assert message in registry.plugins[-1].error
    monkeypatch.setenv("SEGCFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="SEGCFT_STRICT_PLUGINS"):
        plugins.load_registry([("p", plugin)], entry_points=False)


def test_factory_must_return_a_cft_objective():
    class WrongPlugin:
        @segcft.hookimpl
        def segcft_register_objectives(self, register):
            register("wrong", lambda config, ctx: torch.nn.Linear(1, 1), config=BrightConfig)

    plugins.register_plugin(WrongPlugin(), "wrong-plugin")
    cfg = load_run_config(preset="smoke")
    info = build_dataset(cfg, "val").info
    with pytest.raises(PluginError, match=r"returned Linear, not a segcft\.objectives\.base\.CFTObjective"):
        build_objective("wrong", info, cfg.cft, eps=1.0)
    with pytest.raises(ConfigError, match="'none' is the pre-trained generator"):
        build_objective("none", info, cfg.cft, eps=1.0)
