"""benchmarks/gpu_check.sh --dry-run: every part of the GPU check (kernel benchmark with eager,
torch.compile and segcft providers, the 3D and 2D step benchmarks, the summary) runs on the CPU
at tiny sizes, so the script a GPU machine runs once cannot rot unnoticed. Runs in the default
test suite (CI) in well under a minute; the CUDA build and tests are what it skips."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"check.log", "kernels.csv", "step3d.csv", "step2d.csv", "head_grad.csv", "summary.csv", "summary.txt"}


def _run(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=240)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    done = _run(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_writes_few_small_plainly_named_files(dry_run: Path) -> None:
    files = {p.name for p in dry_run.iterdir()}
    assert files == FILES
    for name in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
        assert (dry_run / name).stat().st_size < 16 * 2**20


def test_dry_run_runs_every_part(dry_run: Path) -> None:
    parts = {r["name"]: r["value"] for r in _rows(dry_run / "summary.csv") if r["section"] == "part"}
    assert parts == {
        "env": "ok",
        "build": "dry-run",
        "tests_cuda": "dry-run",
        "tests_ops": "dry-run",
        "kernels_area_loss": "ok",
        "step3d": "ok",
        "head_grad": "ok",
        "kernels_soft_area": "ok",
        "step2d_64": "ok",
    }


def test_kernel_rows_cover_both_ops_every_provider_and_the_bandwidth(dry_run: Path) -> None:
    rows = _rows(dry_run / "kernels.csv")
    assert {r["op"] for r in rows} == {"area_loss", "soft_area"}
    assert {r["provider"] for r in rows} == {"eager", "compile", "segcft"}
    assert {r["case"] for r in rows} == {"2d-2x3x16x16", "2d-2x3x16x16+regions", "3d-1x3x8x8x8", "3d-1x3x8x8x8+regions"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["pct_copy_bw"]) >= 0 and float(r["copy_GBps"]) > 0
    targets = [r for r in _rows(dry_run / "summary.csv") if r["section"] == "target"]
    # per op, 4 cases x 3 modes x 3 targets (eager, compile, copy bandwidth)
    assert len(targets) == 2 * 4 * 3 * 3
    assert all(r["note"].split()[0] in ("PASS", "FAIL") for r in targets)
    text = (dry_run / "summary.txt").read_text()
    assert "kernel targets:" in text and "copy bandwidth:" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| op | case | mode |") and len(table) == 1 + 2 * 4 * 3  # header + rows


def test_step_rows_have_rates(dry_run: Path) -> None:
    step3d = _rows(dry_run / "step3d.csv")
    assert [r["spec"] for r in step3d] == ["reg:bf16", "seg:bf16", "pos-seg:bf16", "pos-seg"]
    assert all(float(r["volumes_per_cpu_s"]) > 0 for r in step3d)
    step2d = _rows(dry_run / "step2d.csv")
    assert [(r["shape"], r["variant"]) for r in step2d] == [("64", "reg"), ("64", "seg-fused")]
    summary = _rows(dry_run / "summary.csv")
    assert sum(r["section"] == "step3d" for r in summary) == 4 and sum(r["section"] == "step2d" for r in summary) == 2
    env = {r["name"]: r["value"] for r in summary if r["section"] == "env"}
    assert env["torch"] and env["gpu"] and env["build"] == "dry-run"


def test_parts_past_the_budget_are_skipped_and_the_summary_still_written(tmp_path: Path) -> None:
    done = _run(tmp_path, GPU_CHECK_BUDGET_S="5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "check.log").read_text()
    for part in ("env", "kernels_area_loss", "step3d", "head_grad", "kernels_soft_area", "step2d_64"):
        assert f"SKIP {part}:" in log
    parts = {r["name"]: r["value"] for r in _rows(tmp_path / "summary.csv") if r["section"] == "part"}
    assert parts["kernels_area_loss"] == "skipped" and parts["step3d"] == "skipped"


def test_summary_verdicts_follow_the_targets(tmp_path: Path) -> None:
    """segcft at 4x eager, 1.5x compile and 80 % of copy bandwidth passes all three; at 2x eager,
    0.5x compile and 10 % it fails all three."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(provider: str, case: str, ms: float, pct: str) -> dict[str, str]:
        return {"op": "area_loss", "case": case, "mode": "fwd", "provider": provider, "ms": str(ms), "p20_ms": "0",
                "p80_ms": "0", "floor_ms": "0", "MB": "", "pct_copy_bw": pct, "copy_GBps": "100"}

    rows = [row("eager", "good", 4.0, ""), row("compile", "good", 1.5, ""), row("segcft", "good", 1.0, "80"),
            row("eager", "bad", 2.0, ""), row("compile", "bad", 0.5, ""), row("segcft", "bad", 1.0, "10")]
    _, verdicts = gpu_summary.kernel_rows(rows)
    assert [v.split()[0] for v in verdicts if " good " in v] == ["PASS"] * 3
    assert [v.split()[0] for v in verdicts if " bad " in v] == ["FAIL"] * 3


def test_summary_judges_on_gpu_time_where_measured(tmp_path: Path) -> None:
    """With gpu_ms in the rows (kernels.py on a GPU), the targets follow the GPU time, not the
    call time: segcft slower per call (host overhead) but 4x/1.5x faster on the device passes,
    and the table gains the GPU columns."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(provider: str, call_ms: float, gpu_ms: float, gpu_pct: str) -> dict[str, str]:
        return {"op": "soft_area", "case": "c", "mode": "fwd", "provider": provider, "ms": str(call_ms),
                "p20_ms": "0", "p80_ms": "0", "floor_ms": "0", "MB": "", "pct_copy_bw": "5", "copy_GBps": "100",
                "gpu_ms": str(gpu_ms), "gpu_pct_copy_bw": gpu_pct}

    rows = [row("eager", 0.1, 0.4, ""), row("compile", 0.1, 0.15, ""), row("segcft", 0.5, 0.1, "85")]
    _, verdicts = gpu_summary.kernel_rows(rows)
    assert [v.split()[0] for v in verdicts] == ["PASS"] * 3
    assert all("(GPU time)" in v for v in verdicts)
    table = gpu_summary.kernel_table(rows)
    assert "segcft GPU ms" in table[0] and table[2].endswith("| 4.00 | 1.50 | 85 |")
    call_only = [{k: v for k, v in r.items() if not k.startswith("gpu")} for r in rows]
    assert [v.split()[0] for v in gpu_summary.kernel_rows(call_only)[1]] == ["FAIL"] * 3


def test_named_parts_are_skipped_and_a_misspelt_one_stops_the_check(tmp_path: Path) -> None:
    """GPU_CHECK_SKIP skips the parts it names (the summary still written); a name that is no part
    exits 2 before any part runs, rather than letting the part run unnoticed."""
    skip = "kernels_area_loss step3d kernels_soft_area step2d_64"
    done = _run(tmp_path / "skip", GPU_CHECK_SKIP=skip)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = {r["name"]: r["value"] for r in _rows(tmp_path / "skip" / "summary.csv") if r["section"] == "part"}
    assert all(parts[p] == "skipped" for p in skip.split()) and parts["env"] == "ok"
    bad = _run(tmp_path / "bad", GPU_CHECK_SKIP="step3d kernels")
    assert bad.returncode == 2 and "unknown part 'kernels'" in bad.stderr
    assert not (tmp_path / "bad").exists()
