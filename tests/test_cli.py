"""The Click CLI: listings, the thin wiring of train/evaluate/counterfactual/data/doctor to the
library, missing library functions, user errors (one line, exit 2) and start-up cost."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import segcft
from segcft import plugins
from segcft.cli import cli
from segcft.errors import UserError
from segcft.train.context import MALLOC_VARIABLES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def builtin_only(monkeypatch):
    monkeypatch.setenv("SEGCFT_LOAD_PLUGINS", "")
    monkeypatch.delenv("SEGCFT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield
    plugins.reset()


def run(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="segcft")


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\nfrom segcft.cli import main\n"
        "for argv in (['--help'], ['--version'], ['plugins'], ['list', 'generators'], ['train', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "SEGCFT_LOAD_PLUGINS": ""})
    assert res.returncode == 0, res.stderr
    assert "Commands:" in res.stdout and segcft.__version__ in res.stdout


def test_plugins_json_lists_the_builtins():
    res = run("plugins", "--json")
    assert res.exit_code == 0, res.output
    (builtin,) = json.loads(res.output)
    assert builtin["name"] == "segcft.builtin" and builtin["registered"]["generators"] == ["hvae"]


def test_list_json_and_text():
    res = run("list", "segmentors", "--json")
    (unet,) = json.loads(res.output)
    assert unet["factory"] == "segcft.models.unet:build" and unet["dims"] == [2, 3]
    assert any(f["name"] == "channels" and f["type"] == "a list of int" for f in unet["config"])
    text = run("list", "datasets").output
    assert "ccta-phantom  [3D, plugin segcft.builtin]" in text and "cxr-phantom" in text
    assert run("list", "widgets").exit_code == 2


class Gen:
    @segcft.hookimpl
    def segcft_register_generators(self, register):
        from segcft.models.configs import CNNRegressorConfig

        def build(config, info):
            import torch

            return torch.nn.Linear(config.width, 3)

        register("lin", build, config=CNNRegressorConfig, dims=(2,))
        register("boom", "segcft_missing_module_abc:build", config=CNNRegressorConfig)


def test_list_verbose_counts_generator_parameters_and_guards_errors(monkeypatch):
    plugins.register_plugin(Gen(), "gen")
    info = types.SimpleNamespace(name="fake")
    monkeypatch.setattr("segcft.plugins.Entry.load", _loader(info))
    res = run("list", "generators", "--verbose")
    assert res.exit_code == 0, res.output
    assert "parameters: 51 (default config, fake)" in res.output  # Linear(16, 3)
    assert "parameters: unavailable (ModuleNotFoundError" in res.output
    assert "width: int = 16  channels of the first conv" in res.output


def _loader(info):
    real = plugins.Entry.load

    def load(self):
        if self.kind == "dataset":
            return lambda config, split: types.SimpleNamespace(info=info)
        return real(self)

    return load


@pytest.fixture
def trained(monkeypatch):
    calls = []

    def run_training(cfg, run_dir, *, resume=None, only=None, from_stage=None, segmentor_checkpoint=None):
        calls.append(dict(cfg=cfg, run_dir=run_dir, resume=resume, only=only, from_stage=from_stage,
                          segmentor_checkpoint=segmentor_checkpoint))
        return Path(run_dir) / "report.md"

    fake_module(monkeypatch, "segcft.train", run_training=run_training)
    return calls


def test_train_builds_the_config_and_calls_the_library(trained, tmp_path):
    ckpt = tmp_path / "seg.safetensors"
    ckpt.write_bytes(b"x")
    res = run("train", "--preset", "smoke", "--set", "generator.beta=2.5", "--seed", "7", "--device", "cpu",
              "--cft", "seg", "--cft", "reg", "--run-dir", str(tmp_path / "r"), "--resume", "auto",
              "--only", "generator", "--only", "cft", "--segmentor-checkpoint", str(ckpt))
    assert res.exit_code == 0, res.output
    (call,) = trained
    cfg = call["cfg"]
    assert (cfg.seed, cfg.device, cfg.cft.modes, cfg.generator.params.beta) == (7, "cpu", ("seg", "reg"), 2.5)
    assert cfg.train.generator.steps == 4  # smoke preset
    assert call["run_dir"] == tmp_path / "r" and call["resume"] == "auto"
    assert call["only"] == ["generator", "cft"] and call["from_stage"] is None
    assert call["segmentor_checkpoint"] == ckpt


def test_train_default_run_dir_and_resume_needs_run_dir(trained):
    assert run("train").exit_code == 0
    assert trained[0]["run_dir"].parts[0] == "runs" and trained[0]["run_dir"].name.startswith("cxr-phantom-hvae-")
    res = run("train", "--resume", "auto")
    assert res.exit_code == 2 and "--resume needs --run-dir" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generator", "hvea"], "unknown generator 'hvea'; did you mean 'hvae'?"),
        (["--set", "generator.beta=abc"], "generator.beta: expected float, got 'abc'"),
        (["--set", "cft.modez=[seg]"], "unknown key 'modez'; did you mean 'modes'?"),
        (["--config", "/nonexistent/run.yaml"], "does not exist"),
        (["--cft", "magic"], "expected one of 'none', 'reg', 'seg', 'pos-seg', got 'magic'"),
    ],
)
def test_train_user_errors_are_one_line_exit_2(trained, args, message):
    res = run("train", *args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output and not trained


def test_missing_library_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "segcft.train", None)  # the module does not exist
    res = run("train", "--preset", "smoke")
    assert res.exit_code == 2
    assert res.output.strip() == "Error: 'segcft train' is not available in this installation: module segcft.train is missing"
    fake_module(monkeypatch, "segcft.evaluate")  # the module exists, the function does not
    res = run("evaluate", "--run", str(REPO))
    assert res.exit_code == 2 and "segcft.evaluate.evaluate_run is missing" in res.output


def test_library_errors_are_not_masked(monkeypatch):
    def run_training(cfg, run_dir, **kwargs):
        raise ValueError("a real bug")

    fake_module(monkeypatch, "segcft.train", run_training=run_training)
    res = run("train")
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)


def test_user_error_from_the_library_and_debug(monkeypatch):
    def run_training(cfg, run_dir, **kwargs):
        raise UserError("checkpoint runs/x/last.safetensors does not exist")

    fake_module(monkeypatch, "segcft.train", run_training=run_training)
    res = run("train")
    assert res.exit_code == 2 and res.output == "Error: checkpoint runs/x/last.safetensors does not exist\n"
    res = run("--debug", "train")
    assert isinstance(res.exception, UserError)  # re-raised: the traceback is shown


def test_evaluate_and_counterfactual_call_the_library(monkeypatch, tmp_path):
    seen = {}
    fake_module(
        monkeypatch,
        "segcft.evaluate",
        evaluate_run=lambda run_dir, split="test", n=None: seen.update(evaluate=(run_dir, split, n)) or {},
        counterfactual=lambda run_dir, input, interventions, out, png=None, particles=1, mode=None, echo=print,
            diff=None: seen.update(cf=(run_dir, input, interventions, out, png, particles, mode, diff)) or {},
    )
    assert run("evaluate", "--run", str(tmp_path), "--split", "val", "--n", "5").exit_code == 0
    assert seen["evaluate"] == (tmp_path, "val", 5)
    res = run("counterfactual", "--run", str(tmp_path), "--input", "12", "--do", "heart_area=+20%",
              "--do", "age=x1.2", "--out", str(tmp_path / "cf.tiff"), "--particles", "4", "--mode", "seg",
              "--diff", str(tmp_path / "d.tiff"))
    assert res.exit_code == 0, res.output
    assert seen["cf"] == (
        tmp_path, "12", ["heart_area=+20%", "age=x1.2"], tmp_path / "cf.tiff", None, 4, "seg", tmp_path / "d.tiff"
    )
    bad = run("counterfactual", "--run", str(tmp_path), "--input", "1", "--do", "age", "--out", "x.tiff")
    assert bad.exit_code == 2 and "expected VAR=VALUE" in bad.output


def test_data_commands_call_the_library(monkeypatch, tmp_path):
    # the data commands resolve (name, config) with the real resolve_dataset, then call the library
    from segcft.data.tools import resolve_dataset

    seen = {}
    fake_module(
        monkeypatch,
        "segcft.data.tools",
        resolve_dataset=resolve_dataset,
        check_dataset=lambda name, config, samples: ["mask 3: label 7 is not declared"],
        measure_dataset=lambda name, out, config: seen.update(measure=(name, config.path, out)),
        export_dataset=lambda name, config, out, n, fmt: seen.update(export=(name, config, out, n, fmt)),
        exported_counts=lambda out: {"train": 1, "val": 1, "test": 1},
        show_dataset=lambda name, out, config, label: seen.update(show=(name, out, label)),
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.tif").write_bytes(b"")
    res = run("data", "check", str(tmp_path))
    assert res.exit_code == 2 and "label 7 is not declared" in res.output
    assert run("data", "measure", str(tmp_path), "--out", str(tmp_path / "m.csv")).exit_code == 0
    assert seen["measure"] == ("tiff", str(tmp_path.resolve()), tmp_path / "m.csv")
    res = run("data", "export", "--dataset", "cxr-phantom", "--out", str(tmp_path / "e"), "--n", "3", "--set", "size=48")
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'e'}: 3 samples (train 1, val 1, test 1)" in res.output
    name, config, out, n, fmt = seen["export"]
    assert (name, config.size, out, n, fmt) == ("cxr-phantom", 48, tmp_path / "e", 3, "tiff")
    bad = run("data", "export", "--dataset", "cxr-phantm", "--out", str(tmp_path / "e"), "--n", "3")
    assert bad.exit_code == 2 and "Error: --dataset: unknown dataset 'cxr-phantm'; did you mean 'cxr-phantom'" in bad.output
    assert run("data", "show", "tiff", "--out", str(tmp_path / "s.png")).exit_code == 0
    assert seen["show"] == ("tiff", tmp_path / "s.png", "tiff")


def test_doctor_reports_the_kernel_backend(monkeypatch):
    fake_module(monkeypatch, "segcft.ops", backend_report=lambda: "cpu: segcft._C (avx2)")
    res = run("doctor")
    assert res.exit_code == 0, res.output
    assert "cpu: segcft._C (avx2)" in res.output and "segcft.builtin" in res.output


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="segcft tunes glibc's malloc only")
@pytest.mark.parametrize("user_value", [None, "1"])
def test_doctor_reports_cpu_memory_and_the_users_choice(user_value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in MALLOC_VARIABLES}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    out = subprocess.run(
        [sys.executable, "-m", "segcft", "doctor"], env=env, capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("CPU memory:"))
    if user_value is None:
        assert line.startswith("CPU memory: CPU runs keep freed memory in glibc's heap"), line
    else:
        assert line.startswith("CPU memory: as you set it (THP_MEM_ALLOC_ENABLE=1)"), line


class Commands:
    @segcft.hookimpl
    def segcft_register_commands(self, cli):
        @cli.command("hello")
        def hello() -> None:
            """Say hello."""
            click.echo("hello from a plugin")


def test_plugins_add_commands():
    plugins.register_plugin(Commands(), "commands")
    assert run("hello").output == "hello from a plugin\n"
    assert "hello" in run("--help").output
    plugins.reset()
    assert run("hello").exit_code == 2  # gone with the plugin


def test_shell_completion_of_component_names():
    env = {**os.environ, "SEGCFT_LOAD_PLUGINS": "", "_SEGCFT_COMPLETE": "bash_complete",
           "COMP_WORDS": "segcft train --generator h", "COMP_CWORD": "3"}
    code = "import sys; sys.argv[0] = 'segcft'; from segcft.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert res.stdout.split() == ["plain,hvae"]
