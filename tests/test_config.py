"""Run config: presets, merge order, type checks, component resets, errors and round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import segcft
from segcft import plugins
from segcft.config import (
    PRESETS,
    RunConfig,
    component_params,
    config_fields,
    dump_run_config,
    load_run_config,
    run_config_from_dict,
    run_config_to_dict,
)
from segcft.errors import ConfigError


@dataclass
class AltGenConfig:
    depth: int = field(default=2, metadata={"help": "layers"})
    beta: float = field(default=0.5, metadata={"help": "KL weight"})
    tag: str | None = field(default=None, metadata={"help": "optional tag"})


class AltGenerator:
    @segcft.hookimpl
    def segcft_register_generators(self, register):
        register("alt", lambda config, info: None, config=AltGenConfig, dims=(2,))


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    plugins.reset()
    plugins.register_plugin(AltGenerator(), "alt-plugin")
    yield
    plugins.reset()


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_completely(preset):
    cfg = load_run_config(preset=preset)
    assert isinstance(cfg, RunConfig)
    assert all(getattr(cfg, k).name for k in ("dataset", "generator", "segmentor", "regressor"))
    assert type(cfg.generator.params).__name__ == "HVAEConfig"


def test_preset_sizes_are_ordered():
    smoke, quick, paper = (load_run_config(preset=p) for p in ("smoke", "quick", "paper"))
    assert smoke.train.generator.steps < quick.train.generator.steps < paper.train.generator.steps
    assert paper.generator.params.preset == "192" and paper.dataset.params.size == 192
    assert quick.dataset.params.size == 64


def test_stage_defaults_follow_the_hvae_convention():
    cfg = RunConfig()
    g = cfg.train.generator
    assert (g.lr, g.weight_decay, g.warmup, g.grad_clip, g.ema) == (1e-3, 0.01, 100, 350.0, 0.999)
    assert (cfg.cft.lr, cfg.cft.lr_lagrange, cfg.cft.damping, cfg.cft.penalty) == (1e-4, 1e-2, 100.0, "l1")


def test_merge_order(tmp_path):
    f = write(tmp_path / "run.yaml", {"seed": 5, "generator": {"beta": 3.0}, "cft": {"steps": 7}})
    cfg = load_run_config(f, "smoke", ["cft.steps=9", "train.generator.lr=0.002"], flags={"seed": 6})
    assert cfg.generator.params.beta == 3.0  # file over preset
    assert cfg.cft.steps == 9  # --set over file
    assert cfg.seed == 6  # flag over file
    assert cfg.train.generator.lr == 0.002
    assert cfg.train.generator.steps == load_run_config(preset="smoke").train.generator.steps  # preset kept


def test_set_values_are_typed():
    cfg = load_run_config(
        overrides=["cft.modes=[reg, seg]", "cft.soft_labels=true", "generator.preset=192",
                   "segmentor.channels=[4, 8]", "evaluate.n=null", "train.generator.grad_clip=10"]
    )
    assert cfg.cft.modes == ("reg", "seg") and cfg.cft.soft_labels is True
    assert cfg.generator.params.preset == "192"  # text for string fields, not the int 192
    assert cfg.segmentor.params.channels == (4, 8)
    assert cfg.evaluate.n is None and cfg.train.generator.grad_clip == 10.0
    assert isinstance(cfg.train.generator.grad_clip, float)
    assert load_run_config(overrides=["cft.soft_labels=regressor"]).cft.soft_labels == "regressor"


def test_changing_a_component_resets_its_params(tmp_path):
    f = write(tmp_path / "run.yaml", {"generator": {"name": "hvae", "beta": 4.0}})
    cfg = load_run_config(f, components={"generator": "alt"}, overrides=["generator.depth=5"])
    assert cfg.generator.name == "alt"
    assert cfg.generator.params == AltGenConfig(depth=5, beta=0.5)
    same = load_run_config(f, components={"generator": "hvae"})
    assert same.generator.params.beta == 4.0  # the same name keeps the params


def test_param_without_name_in_empty_section_is_an_error():
    with pytest.raises(ConfigError, match=r"set generator 'name' before its parameters \(beta\)"):
        run_config_from_dict({"generator": {"beta": 1.0}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generator.bta=2", r"--set generator.bta=2: generator: unknown key 'bta'; did you mean 'beta'\? "
                            r"\(valid keys: preset, .*beta"),
        ("generator.beta=abc", r"generator.beta: expected float, got 'abc'"),
        ("train.generator.steps=1.5", r"train.generator.steps: expected int, got 1.5"),
        ("cft.soft_labels=1", r"cft.soft_labels: expected bool or one of 'regressor', got 1"),
        ("cft.soft_labels=reg", r"cft.soft_labels: expected bool or one of 'regressor', got 'reg'"),
        ("cft.penalty=l3", r"cft.penalty: expected one of 'l1', 'l2', 'huber', got 'l3'"),
        ("cft.modes=[seg, sge]", r"cft.modes\[1\]: expected one of 'none', 'reg', 'seg', 'pos-seg', got 'sge'"),
        ("segmentor.channels=4", r"segmentor.channels: expected a list of int, got 4"),
        ("device=tpu", r"device: expected one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        ("trian.generator.steps=1", r"unknown key 'trian'; did you mean 'train'\?"),
        ("generator.name=hvea", r"unknown generator 'hvea'; did you mean 'hvae'\?"),
        ("generator", r"expected key=value"),
        ("cft.lambda_init=-1", r"cft.lambda_init: expected a value >= 0, got -1.0"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides=[override])


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: {name: hvae, beta: 2.0, beta: [}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML"):
        load_run_config(bad)
    wrong = write(tmp_path / "wrong.yaml", {"generator": {"name": "hvae", "preset": 64}})
    with pytest.raises(ConfigError, match=r"config file '.*wrong.yaml': generator.preset: expected str, got 64 \(quote"):
        load_run_config(wrong)
    with pytest.raises(ConfigError, match=r"unknown preset 'quik'; did you mean 'quick'\?"):
        load_run_config(preset="quik")


def test_yaml_is_never_evaluated(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(evil)


def test_dims_mismatch_is_reported():
    with pytest.raises(ConfigError, match=r"generator 'alt' supports 2D images but dataset 'ccta-phantom' is 3D"):
        load_run_config(components={"dataset": "ccta-phantom", "generator": "alt"})


def test_dump_reproduces_the_run(tmp_path):
    cfg = load_run_config(preset="smoke", components={"generator": "alt"},
                          overrides=["generator.tag=x", "seed=3", "cft.modes=[seg]", "device=cpu"])
    path = dump_run_config(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "generator:\n  name: alt\n  depth: 2" in text.replace("\r", "")
    again = load_run_config(path)  # over the default preset: the dump must win everywhere
    assert again == cfg
    assert run_config_from_dict(yaml.safe_load(text)) == cfg
    assert run_config_to_dict(again) == run_config_to_dict(cfg)


def test_component_params_for_one_component():
    params = component_params("dataset", "cxr-phantom", ["size=48", "seed=2"])
    assert (params.size, params.seed) == (48, 2)
    with pytest.raises(ConfigError, match="unknown key 'sise'"):
        component_params("dataset", "cxr-phantom", ["sise=48"])


def test_config_fields_lists_defaults_and_help():
    rows = {r["name"]: r for r in config_fields(AltGenConfig)}
    assert rows["beta"] == {"name": "beta", "type": "float", "default": 0.5, "help": "KL weight"}
    assert rows["tag"]["type"] == "str or null"


def _quick_overlay() -> dict:
    path = segcft.config.preset_path("quick")
    return yaml.safe_load(path.read_text())["when_3d"]


def test_quick_3d_overlay_applies_only_to_3d_datasets(tmp_path):
    overlay = _quick_overlay()
    flat = load_run_config()
    volume = load_run_config(components={"dataset": "ccta-phantom"})
    assert volume.dataset.name == "ccta-phantom" and volume.generator.params.preset == "auto"
    resolved = run_config_to_dict(volume)
    for stage, values in overlay["train"].items():
        for key, value in values.items():
            assert resolved["train"][stage][key] == value, (stage, key)
    for key, value in overlay["cft"].items():
        if key == "objectives":  # per mode, the keys the overlay sets
            for mode, settings in value.items():
                assert {k: resolved["cft"][key][mode][k] for k in settings} == settings, (key, mode)
        else:
            assert resolved["cft"][key] == value, key
    # 3D evaluates as many subjects as 2D: one fine-tuning run's per-region MAPE read on 16 volumes
    # differed from 64 by up to 11 points (benchmarks/REPRODUCTION.md, session 22).
    assert "evaluate" not in overlay and volume.evaluate.n == flat.evaluate.n == 64
    # The 2D run keeps the preset's conditional prior and Seg-CFT locality; 3D sets both back.
    assert (flat.generator.params.prior, flat.cft.objectives["seg"].locality) == ("conditional", 100.0)
    assert (volume.generator.params.prior, volume.cft.objectives["seg"].locality) == ("exogenous", 0.0)
    # 2D keeps the preset's own values.
    assert (flat.train.generator.steps, flat.train.generator.batch_size, flat.cft.steps) == (1500, 16, 400)
    # The dataset may come from --set or a config file as well; explicit values still win.
    by_set = load_run_config(overrides=["dataset.name=ccta-phantom", "cft.steps=7"])
    assert by_set.train.generator == volume.train.generator and by_set.cft.steps == 7
    by_file = load_run_config(write(tmp_path / "c.yaml", {"dataset": {"name": "ccta-phantom"}, "cft": {"lr": 0.5}}))
    assert by_file.train.generator == volume.train.generator and by_file.cft.lr == 0.5
    assert load_run_config(preset="smoke", components={"dataset": "ccta-phantom"}).cft.steps == 2  # no overlay


def test_dump_carries_the_settings_of_every_mode(tmp_path):
    """A run whose layers never set a mode's settings still dumps them, so reading the dump back
    over the default preset (which sets Seg-CFT's locality) gives the same run."""
    cfg = load_run_config(preset="smoke", overrides=["cft.modes=[none, seg]"])
    assert cfg.cft.objectives["seg"].locality == 0.0 and "none" not in cfg.cft.objectives
    path = dump_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(path) == cfg


def test_3d_dump_reproduces_the_run_alone(tmp_path):
    cfg = load_run_config(components={"dataset": "ccta-phantom"}, overrides=["cft.modes=[none, pos-seg]"])
    path = dump_run_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(path) == cfg
    assert load_run_config(path, preset=None) == cfg
    assert load_run_config(path, preset="smoke") == cfg


@pytest.mark.parametrize(
    "overlay,match",
    [
        ({"cft": {"stepz": 3}}, r"preset 'quick' \(bad.yaml\): when_3d: cft: unknown key 'stepz'"),
        ({"cft": {"steps": "many"}}, r"when_3d: cft.steps: expected int, got 'many'"),
        ({"dataset": {"name": "ccta-phantom"}}, r"when_3d cannot set 'dataset'"),
        ([1, 2], r"when_3d: expected a mapping"),
    ],
)
def test_broken_3d_overlay_fails_in_2d_runs_too(tmp_path, monkeypatch, overlay, match):
    base = yaml.safe_load(segcft.config.preset_path("quick").read_text())
    bad = write(tmp_path / "bad.yaml", {**base, "when_3d": overlay})
    monkeypatch.setattr(segcft.config.resolve, "preset_path", lambda name: bad)
    with pytest.raises(ConfigError, match=match):
        load_run_config()


def test_float_fields_accept_exponent_literals_that_yaml_reads_as_text():
    cfg = load_run_config(preset="smoke", overrides=["cft.lr=1e-3", "cft.damping=2E1"])
    assert (cfg.cft.lr, cfg.cft.damping) == (1e-3, 20.0)
    with pytest.raises(ConfigError, match="cft.lr: expected float"):
        load_run_config(preset="smoke", overrides=["cft.lr=1e-3x"])
