"""Bad configuration inputs: each is refused while the config is resolved (or the plugin
registers its config class), with one line naming the key and exit status 2, before any
training; plus the container types a plugin config may use, round-tripped through YAML."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml
from click.testing import CliRunner

import segcft
from segcft import plugins
from segcft.cli import cli
from segcft.config import (
    check_round_trip,
    dump_run_config,
    load_run_config,
    read_yaml,
    resume_config,
    run_config_from_dict,
)
from segcft.errors import ConfigError


@dataclass
class Inner:
    depth: int = field(default=2, metadata={"help": "layers", "ge": 1})
    scale: float = field(default=0.5, metadata={"help": "a factor", "gt": 0})


@dataclass
class ContainersConfig:
    widths: list[int] = field(default_factory=list, metadata={"help": "list", "ge": 1})
    sizes: tuple[int, ...] = field(default=(4, 8), metadata={"help": "variable tuple"})
    pair: tuple[int, float] = field(default=(1, 2.0), metadata={"help": "fixed tuple"})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "mapping", "ge": 0})
    tag: Optional[str] = field(default=None, metadata={"help": "optional"})  # noqa: UP045 - the typing spelling
    limit: int | None = field(default=None, metadata={"help": "optional int", "ge": 1})
    kind: Literal["a", "b"] = field(default="a", metadata={"help": "literal"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "nested dataclass"})
    blocks: list[Inner] = field(default_factory=list, metadata={"help": "list of dataclasses"})


class ContainersPlugin:
    @segcft.hookimpl
    def segcft_register_generators(self, register):
        register("containers", lambda config, info: None, config=ContainersConfig, dims=(2,))


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    monkeypatch.delenv("SEGCFT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    plugins.register_plugin(ContainersPlugin(), "containers-plugin")
    yield
    plugins.reset()


def train(*args: str):
    return CliRunner().invoke(cli, ["train", *args], prog_name="segcft")


def assert_refused(res, *needles: str) -> None:
    """Exit 2 with exactly one line of output that contains every needle."""
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


# -- ranges and numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.generator.log_every=0", "train.generator.log_every"),  # >= 1: was a ZeroDivisionError mid-stage
        ("seed=1000000000000000000000000000000", "seed"),  # beyond 64 bits: was an overflow in torch.manual_seed
        ("seed=9223372036854775808", "seed"),  # above SEED_MAX = 2**63 - 1
        ("seed=-1", "seed"),  # seeds are >= 0
        ("cft.lr=.nan", "cft.lr"),  # floats are finite: NaN trained a NaN generator
        ("cft.lr=.inf", "cft.lr"),
        ("cft.lr=1e400", "cft.lr"),  # overflows to inf when read
        ("cft.lr=0", "cft.lr"),  # learning rates are > 0
        ("train.segmentor.batch_size=0", "train.segmentor.batch_size"),
        ("train.generator.ema=1.0", "train.generator.ema"),  # decays lie in [0, 1)
        ("cft.grad_clip=-1", "cft.grad_clip"),  # >= 0 (0: off)
        ("evaluate.n=0", "evaluate.n"),
        ("mechanisms.hidden=0", "mechanisms.hidden"),
    ],
)
def test_out_of_range_values_exit_2_before_training(tmp_path, override, key):
    """Each value is refused while the config resolves: exit 2, one line naming the key."""
    res = train("--preset", "smoke", "--device", "cpu", "--run-dir", str(tmp_path / "r"), "--set", override)
    assert_refused(res, key)
    assert not (tmp_path / "r").exists()


def test_plugin_field_ranges_apply_to_every_item():
    """A plugin's declared ``ge`` applies to each number of a list and of a mapping."""
    base = ["generator.name=containers"]
    with pytest.raises(ConfigError, match=r"generator.widths\[1\]: expected a value >= 1, got 0"):
        load_run_config(preset="smoke", overrides=base + ["generator.widths=[2, 0]"])
    with pytest.raises(ConfigError, match=r"generator.weights.a: expected a value >= 0, got -1.0"):
        load_run_config(preset="smoke", overrides=base + ["generator.weights={a: -1}"])
    with pytest.raises(ConfigError, match=r"generator.inner.depth: expected a value >= 1, got 0"):
        load_run_config(preset="smoke", overrides=base + ["generator.inner.depth=0"])


def test_long_values_are_quoted_truncated():
    """A huge value in an error message is cut to about 200 characters."""
    res = train("--preset", "smoke", "--set", "cft.steps=" + "x" * 100_000)
    assert_refused(res, "cft.steps")
    assert len(res.output) < 800


# -- plugin config types -----------------------------------------------------------------------


def test_container_types_coerce_and_round_trip(tmp_path):
    """list, tuple (variable and fixed), dict[str, T], Optional, Literal and nested dataclasses
    are checked, written to YAML and read back equal."""
    cfg = load_run_config(
        preset="smoke",
        overrides=["generator.name=containers", "generator.widths=[3]", "generator.sizes=[1, 2, 3]",
                   "generator.pair=[5, 1e-3]", "generator.weights={a: 1, b: 2.5}", "generator.tag=x",
                   "generator.limit=7", "generator.kind=b", "generator.inner.scale=2",
                   "generator.blocks=[{depth: 3}, {scale: 0.25}]"],
    )
    p = cfg.generator.params
    assert p.widths == [3] and p.sizes == (1, 2, 3) and p.pair == (5, 0.001)
    assert p.weights == {"a": 1.0, "b": 2.5} and p.tag == "x" and p.limit == 7 and p.kind == "b"
    assert p.inner == Inner(2, 2.0) and p.blocks == [Inner(3, 0.5), Inner(2, 0.25)]
    path = dump_run_config(cfg, tmp_path / "config.yaml")
    assert run_config_from_dict(read_yaml(path)) == cfg
    assert load_run_config(path) == cfg
    defaults = load_run_config(preset="smoke", components={"generator": "containers"})
    assert run_config_from_dict(read_yaml(dump_run_config(defaults, tmp_path / "d.yaml"))) == defaults


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generator.widths=3", r"generator.widths: expected a list of int, got 3"),
        ("generator.widths=[a]", r"generator.widths\[0\]: expected int, got 'a'"),
        ("generator.pair=[1, 2, 3]", r"generator.pair: expected a list of 2 items"),
        ("generator.weights=[1]", r"generator.weights: expected a mapping of str to float"),
        ("generator.kind=c", r"generator.kind: expected one of 'a', 'b'"),
        ("generator.blocks=[{dept: 1}]", r"generator.blocks\[0\]: unknown key 'dept'"),
    ],
)
def test_container_types_are_type_checked(override, message):
    """Each wrong container value names the key (and the item) and the expected type."""
    with pytest.raises(ConfigError, match=message):
        load_run_config(preset="smoke", overrides=["generator.name=containers", override])


@dataclass
class SetConfig:
    ids: set[int] = field(default_factory=set, metadata={"help": "not representable in YAML"})


@dataclass
class BadDefaultConfig:
    rate: float = field(default=-1.0, metadata={"help": "a rate", "gt": 0})


@dataclass
class ListDefaultConfig:
    sizes: tuple[int, ...] = field(default_factory=lambda: [1, 2], metadata={"help": "reads back as a tuple"})  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SetConfig, r"field 'ids': set\[int\] cannot be written to YAML"),
        (BadDefaultConfig, r"field 'rate': default: expected a value > 0, got -1.0"),
        (ListDefaultConfig, r"field 'sizes': the default \[1, 2\] reads back as \(1, 2\)"),
    ],
)
def test_unrepresentable_config_class_is_rejected_at_registration(monkeypatch, config, message):
    """A config class the config system cannot check and round-trip fails when it registers,
    with a message naming the field (strict mode turns the skipped plugin into an error)."""

    class Plugin:
        @segcft.hookimpl
        def segcft_register_regressors(self, register):
            register("bad-config", lambda config, info: None, config=config)

    monkeypatch.setenv("SEGCFT_STRICT_PLUGINS", "1")
    with pytest.raises(plugins.PluginError, match=message):
        plugins.load_registry([("bad", Plugin())], entry_points=False)


def test_a_config_that_does_not_round_trip_is_never_written(tmp_path):
    """The round trip is checked before RUN/config.yaml is written (and so before any stage)."""
    cfg = load_run_config(preset="smoke", components={"generator": "containers"})
    cfg.generator.params.sizes = [1, 2]  # a list where the type says tuple: reads back different
    with pytest.raises(ConfigError, match=r"does not read back from its YAML form; differing keys: generator.sizes"):
        dump_run_config(cfg, tmp_path / "run" / "config.yaml")
    assert not (tmp_path / "run" / "config.yaml").exists()
    with pytest.raises(ConfigError, match="generator.sizes"):
        check_round_trip(cfg)


# -- modes and datasets ------------------------------------------------------------------------


def test_paper_preset_resolves_with_modes_its_dataset_supports():
    """The paper preset's modes fit cxr-phantom (no regions, so no pos-seg); nothing is trained."""
    cfg = load_run_config(preset="paper")
    assert cfg.dataset.name == "cxr-phantom" and "pos-seg" not in cfg.cft.modes
    assert set(cfg.cft.modes) == {"none", "reg", "seg"}


def test_pos_seg_on_a_dataset_without_regions_fails_at_resolution(tmp_path):
    """pos-seg needs regions: refused while resolving, before the dataset or a model is built."""
    res = train("--preset", "smoke", "--cft", "pos-seg", "--run-dir", str(tmp_path / "r"))
    assert_refused(res, "cft.modes", "pos-seg", "regions")
    assert not (tmp_path / "r").exists()


# -- stage sections ----------------------------------------------------------------------------


def test_mechanisms_stage_rejects_settings_it_does_not_use():
    """train.mechanisms holds only what the mechanisms stage honours."""
    for key in ("warmup", "grad_clip", "grad_skip", "ema", "checkpoint_every"):
        with pytest.raises(ConfigError, match=rf"train.mechanisms: unknown key '{key}'"):
            load_run_config(preset="smoke", overrides=[f"train.mechanisms.{key}=1"])


def test_older_run_folders_still_load(tmp_path):
    """A RUN/config.yaml written before train.mechanisms lost its unused keys still reads back;
    a new config naming them is refused (previous test)."""
    cfg = load_run_config(preset="smoke")
    path = dump_run_config(cfg, tmp_path / "config.yaml")
    data = read_yaml(path)
    data["train"]["mechanisms"].update(warmup=2, checkpoint_every=0)
    assert run_config_from_dict(data) == cfg


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper", None])
def test_cft_optimiser_fields_equal_what_it_used_from_the_generator_stage(preset):
    """cft's own optimiser fields default (per preset) to the values it used to take from
    train.generator: weight decay, clipping, logging and checkpoints alike, warm-up
    min(generator warm-up, steps // 10 or 1), and no EMA except in the quick preset, which
    fine-tunes with an EMA of its own (0.99 over 400 steps in 2D, 0.9 over 480 in 3D), not the
    generator stage's, and a warm-up of 6 steps in 3D (what its steps were measured with).
    Skipping is the exception: fine-tuning skips only non-finite updates."""
    models = {"generator": "hvae", "segmentor": "unet", "regressor": "cnn"} if preset is None else {}
    for dataset in ("cxr-phantom", "ccta-phantom"):
        cfg = load_run_config(preset=preset, components={"dataset": dataset, **models})
        g, c = cfg.train.generator, cfg.cft
        assert (c.weight_decay, c.grad_clip, c.log_every, c.checkpoint_every) == (
            g.weight_decay, g.grad_clip, g.log_every, g.checkpoint_every)
        assert c.grad_skip == 0.0 < g.grad_skip
        ema = {"cxr-phantom": 0.99, "ccta-phantom": 0.9}[dataset] if preset == "quick" else 0.0
        quick_3d = preset == "quick" and dataset == "ccta-phantom"
        warmup = 6 if quick_3d else min(g.warmup, max(c.steps // 10, 1))
        assert c.warmup == warmup and c.ema == ema and c.ema != g.ema


# -- config files ------------------------------------------------------------------------------


def test_config_file_not_utf8(tmp_path):
    """A config file in another encoding: one line naming the file, exit 2."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1  # r\xe9sum\xe9\n".encode("latin-1"))
    res = train("--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert_refused(res, "latin1.yaml", "not UTF-8")
    assert_nothing_trained(tmp_path / "r")


@pytest.mark.parametrize("inside", [False, True])
def test_config_file_alias_bomb(tmp_path, inside):
    """Billion laughs: aliases that expand to ~10^8 values are refused, quickly. Inside one
    value (``seed: [...]``) the 455-byte file used to hang while the error message quoted it."""
    parts = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines = ["seed: [" + ", ".join(parts) + "]"] if inside else [f"a{i}: {p}" for i, p in enumerate(parts)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    res = train("--config", str(bomb), "--run-dir", str(tmp_path / "r"))
    assert_refused(res, "bomb.yaml", "aliases")
    assert_nothing_trained(tmp_path / "r")


def test_config_file_recursive_alias(tmp_path):
    """An alias inside the collection it names is refused."""
    loop = tmp_path / "loop.yaml"
    loop.write_text("seed: &s [*s]\n")
    res = train("--config", str(loop))
    assert_refused(res, "loop.yaml", "alias")


def test_aliases_within_bounds_still_work(tmp_path):
    """Anchors and merge keys of ordinary size are fine."""
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {steps: 3, batch_size: 4}\n")
    assert read_yaml(ok)["base"] == {"steps": 3, "batch_size": 4}
    ok.write_text("train:\n  segmentor: &s {steps: 3, batch_size: 4}\n  regressor: {<<: *s, steps: 5}\n")
    cfg = load_run_config(ok, "smoke")
    assert (cfg.train.regressor.steps, cfg.train.regressor.batch_size, cfg.train.segmentor.steps) == (5, 4, 3)


@pytest.mark.parametrize("text", ["- seed\n- 1\n", "just text\n", "42\n"])
def test_config_file_not_a_mapping(tmp_path, text):
    """A document that is a list or a scalar: one line, exit 2."""
    f = tmp_path / "list.yaml"
    f.write_text(text)
    res = train("--config", str(f), "--run-dir", str(tmp_path / "r"))
    assert_refused(res, "list.yaml", "expected a mapping of sections")
    assert_nothing_trained(tmp_path / "r")


def test_integer_with_too_many_digits(tmp_path):
    """An integer literal longer than Python converts (4300 digits): one bounded line, exit 2."""
    f = tmp_path / "digits.yaml"
    f.write_text("seed: " + "9" * 10_000 + "\n")
    res = train("--config", str(f))
    assert_refused(res, "digits.yaml", "too many digits")
    assert len(res.output) < 800
    res = train("--set", "seed=" + "9" * 10_000)
    assert_refused(res, "--set seed=", "too many digits")
    assert len(res.output) < 800


def test_config_error_messages_are_bounded():
    """However much of the input a message quotes, it stays short."""
    assert len(str(ConfigError("x" * 100_000))) <= ConfigError.MAX_LENGTH


def test_config_file_too_large(tmp_path):
    """A file over the size limit is not read into memory and parsed."""
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    res = train("--config", str(big))
    assert_refused(res, "big.yaml", "larger than")


def test_config_file_nested_too_deeply(tmp_path):
    """Deep nesting that would exhaust the parser's recursion: one line, exit 2."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 50_000 + "]" * 50_000 + "\n")
    res = train("--config", str(deep))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "deep.yaml" in res.output


def test_set_value_alias_bomb():
    """--set values are read with the same bounded loader."""
    value = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]" + "".join(
        f", &a{i} [" + ", ".join([f"*a{'' if i == 1 else i - 1}"] * 10) + "]" for i in range(1, 8)) + "]"
    res = train("--preset", "smoke", "--set", f"segmentor.channels={value}")
    assert_refused(res, "segmentor.channels", "aliases")


# -- run folder --------------------------------------------------------------------------------


def test_run_dir_under_a_regular_file(tmp_path):
    """--run-dir below a file cannot be created: one line, exit 2, before any work."""
    (tmp_path / "file").write_text("x")
    res = train("--preset", "smoke", "--run-dir", str(tmp_path / "file" / "run"))
    assert_refused(res, "--run-dir", "is a file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_run_dir_without_permission(tmp_path):
    """--run-dir in a folder without write permission: one line, exit 2."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        res = train("--preset", "smoke", "--run-dir", str(locked / "run"))
        assert_refused(res, "--run-dir", "no permission")
    finally:
        locked.chmod(0o700)


# -- resume ------------------------------------------------------------------------------------


def _stored_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    dump_run_config(load_run_config(preset="smoke", flags={"device": "cpu"}), run_dir / "config.yaml")
    return run_dir


def test_resume_with_a_changed_config_is_refused(tmp_path):
    """--resume auto with a different --set: exit 2 listing the differing keys; nothing trained."""
    run_dir = _stored_run(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    res = train("--preset", "smoke", "--device", "cpu", "--set", "cft.steps=3", "--set", "seed=4",
                "--run-dir", str(run_dir), "--resume", "auto")
    assert_refused(res, "--resume", "seed", "cft.steps")
    assert (run_dir / "config.yaml").read_text() == before and not (run_dir / "checkpoints").exists()


def test_resume_with_another_component_is_refused(tmp_path):
    """A component flag that changes the run is a difference too."""
    run_dir = _stored_run(tmp_path)
    res = train("--preset", "smoke", "--generator", "containers", "--run-dir", str(run_dir), "--resume", "auto")
    assert_refused(res, "--resume", "generator.name")


def test_resume_allows_only_the_documented_keys():
    """device and evaluate.* may change on resume; the new values are the ones used."""
    stored = load_run_config(preset="smoke", flags={"device": "cpu"})
    new = load_run_config(preset="smoke", overrides=["device=auto", "evaluate.n=2", "evaluate.split=val"])
    assert resume_config(stored, new, "RUN/config.yaml") is new
    with pytest.raises(ConfigError, match=r"differs from RUN/config.yaml in train.generator.log_every"):
        resume_config(stored, load_run_config(preset="smoke", overrides=["train.generator.log_every=1"]), "RUN/config.yaml")


def test_resume_without_config_options_uses_the_stored_config(tmp_path, monkeypatch):
    """`segcft train --resume auto --run-dir RUN` alone (no preset or config options) resumes
    with RUN/config.yaml, not the default preset."""
    run_dir = _stored_run(tmp_path)
    calls = []
    monkeypatch.setattr("segcft.train.run_training", lambda cfg, run_dir, **kw: calls.append(cfg))
    res = train("--run-dir", str(run_dir), "--resume", "auto")
    assert res.exit_code == 0, res.output
    assert calls[0] == run_config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_help_says_where_n_comes_from():
    """--n defaults to the run config's evaluate.n, as evaluate_run does."""
    res = CliRunner().invoke(cli, ["evaluate", "--help"], prog_name="segcft")
    assert res.exit_code == 0 and "evaluate.n" in " ".join(res.output.split())


def test_largest_seed_gives_valid_derived_seeds() -> None:
    """seed = 2**63 - 1 resolves, and the fine-tuning stage's per-rank seed derived from it
    (``(seed + 13) * 1000 + rank``, over 2**64) still seeds torch; small seeds are unchanged."""
    from segcft.config import SEED_MAX, derived_seed, load_run_config

    cfg = load_run_config(None, "smoke", [f"seed={SEED_MAX}"])
    assert cfg.seed == 2**63 - 1
    import torch

    for rank in (0, 1):
        torch.Generator().manual_seed(derived_seed((cfg.seed + 13) * 1000 + rank))
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed((cfg.seed + 13) * 1000)  # what the stage did before
    assert derived_seed(13_000 + 1) == 13_001
