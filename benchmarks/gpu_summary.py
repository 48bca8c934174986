"""Summary of a benchmarks/gpu_check.sh run: reads $OUT/{check.log, parts.csv, kernels.csv,
step3d.csv, step2d.csv} and writes $OUT/summary.csv (section,name,value,unit,note: the device,
versions, every part's status and every figure) and $OUT/summary.txt (the short version, with
the kernels' PASS/FAIL lines against the targets).

    python benchmarks/gpu_summary.py --out OUT [--build ok|FAILED|dry-run]
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

TARGET_EAGER_X = 3.0
TARGET_COPY_PCT = 70.0
MODES = ("fwd", "bwd", "fwd+bwd")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _gpu() -> tuple[str, str]:
    """Card name and driver version from nvidia-smi ("none" without one)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        name, driver = out.stdout.strip().splitlines()[0].rsplit(",", 1)
        return name.strip(), driver.strip()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "none", "none"


def env_rows(build: str) -> list[list[str]]:
    import torch

    name, driver = _gpu()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return [
        ["env", "gpu", name, "", "nvidia-smi --query-gpu=name"],
        ["env", "driver", driver, "", ""],
        ["env", "torch", torch.__version__, "", ""],
        ["env", "cuda", str(torch.version.cuda), "", "torch.version.cuda"],
        ["env", "python", platform.python_version(), "", ""],
        ["env", "git", sha or "unknown", "", ""],
        ["env", "date", datetime.now(timezone.utc).isoformat(timespec="seconds"), "", ""],
        ["env", "build", build, "", "segcft._C_cuda imports" if build == "ok" else ""],
    ]


def test_rows(log: str) -> list[list[str]]:
    """Pytest's final counts of each test part, from its section of check.log."""
    rows = []
    for part in ("tests_cuda", "tests_ops"):
        m = re.search(rf"===== {part} .*?\n(.*?)----- {part}", log, re.S)
        if not m:
            continue
        finals = [line for line in m.group(1).splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
        counts = dict((k, v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                                     finals[-1] if finals else ""))
        for key in ("passed", "failed", "error", "errors", "skipped"):
            if key in counts:
                rows.append(["tests", f"{part} {key}", counts[key], "tests", ""])
    return rows


def _judged(rows: list[dict[str, str]]) -> tuple[dict, dict]:
    """Milliseconds and % of copy bandwidth per (op, case, mode, provider) that the targets are judged
    on: the GPU time where kernels.py measured it (the kernels' own cost), else the call's median."""
    ms, pct = {}, {}
    for r in rows:
        key = (r["op"], r["case"], r["mode"], r["provider"])
        gpu = r.get("gpu_ms") or ""
        ms[key] = float(gpu or r["ms"])
        pct[key] = r.get("gpu_pct_copy_bw") if gpu else r["pct_copy_bw"]
    return ms, pct


def kernel_rows(rows: list[dict[str, str]]) -> tuple[list[list[str]], list[str]]:
    """Every kernel figure, and the PASS/FAIL lines of segcft against the targets."""
    out, verdicts = [], []
    if rows:
        out.append(["kernels", "copy bandwidth", rows[0]["copy_GBps"], "GB/s", "device-to-device copy, read + write"])
    for r in rows:
        label = f"{r['op']} {r['case']} {r['mode']} {r['provider']}"
        out.append(["kernels", label, r["ms"], "ms", f"p20 {r['p20_ms']} p80 {r['p80_ms']} floor {r['floor_ms']}"])
        if r.get("gpu_ms"):
            out.append(["kernels", label + " GPU", r["gpu_ms"], "ms", "device activity per call (profiler)"])
        if r["MB"]:
            out.append(["kernels", label + " peak", r["MB"], "MiB", "fwd+bwd"])
    ms, pcts = _judged(rows)
    gpu_judged = any(r.get("gpu_ms") for r in rows)
    for op, case, mode in dict.fromkeys((k[0], k[1], k[2]) for k in ms):
        ours = ms.get((op, case, mode, "segcft"))
        if ours is None:
            continue
        label = f"{op} {case} {mode}" + (" (GPU time)" if gpu_judged else "")
        checks = [("x eager", ms[(op, case, mode, "eager")] / ours, TARGET_EAGER_X, "x")]
        if (op, case, mode, "compile") in ms:
            checks.append(("x torch.compile", ms[(op, case, mode, "compile")] / ours, 1.0, "x"))
        checks.append(("% copy bandwidth", float(pcts[(op, case, mode, "segcft")]), TARGET_COPY_PCT, "%"))
        for what, value, target, unit in checks:
            verdict = "PASS" if value >= target else "FAIL"
            out.append(["target", f"{label} {what}", f"{value:.2f}", unit, f"{verdict} (>= {target:g})"])
            verdicts.append(f"{verdict} {label}: {value:.2f} {what} (target >= {target:g})")
    return out, verdicts


def kernel_table(rows: list[dict[str, str]]) -> list[str]:
    """Markdown table (for benchmarks/RESULTS.md): per op, case and mode the three providers'
    median call ms, their GPU ms where measured, segcft's speed-ups and its share of the copy
    bandwidth (both on the GPU time where measured)."""
    call = {(r["op"], r["case"], r["mode"], r["provider"]): float(r["ms"]) for r in rows}
    ms, pct = _judged(rows)
    gpu = any(r.get("gpu_ms") for r in rows)
    head = "| op | case | mode | eager ms | compile ms | segcft ms |"
    if gpu:
        head += " eager GPU ms | compile GPU ms | segcft GPU ms |"
    out = [head + " x eager | x compile | % copy bw |", "|---" * (9 + 3 * gpu) + "|"]
    for op, case, mode in dict.fromkeys((k[0], k[1], k[2]) for k in call):
        keys = [(op, case, mode, p) for p in ("eager", "compile", "segcft")]
        cells = [f"{call[k]:.3f}" if k in call else "-" for k in keys]
        if gpu:
            cells += [f"{ms[k]:.3f}" if k in ms else "-" for k in keys]
        e, c, g = (ms.get(k) for k in keys)
        xe = f"{e / g:.2f}" if e and g else "-"
        xc = f"{c / g:.2f}" if c and g else "-"
        out.append(f"| {op} | {case} | {mode} | {' | '.join(cells)} | {xe} | {xc} | {pct.get(keys[2], '-')} |")
    return out if len(out) > 2 else []


def step_rows(step3d: list[dict[str, str]], step2d: list[dict[str, str]]) -> list[list[str]]:
    out = []
    for r in step3d:
        rate = r.get("volumes_per_s") or r.get("volumes_per_cpu_s", "")
        unit = "volumes/s" if r.get("volumes_per_s") else "volumes/CPU-s"
        step = r.get("step_s") or r.get("step_cpu_s", "")
        note = f"step {step} s; first step {r['first_step_wall_s']} s"
        if r.get("ms gpu busy"):
            note += f"; GPU busy {r['ms gpu busy']} of {r['ms wall profiled']} ms; top kernels: {r['top kernels']}"
        out.append(["step3d", f"{r['volume']} {r['spec']} batch {r['batch']}", rate, unit, note])
    for r in step2d:
        out.append(["step2d", f"{r['shape']} {r['variant']} batch {r['batch']}", r["samples_per_s"], "images/s",
                    f"step {r['step_s']} s; peak {r['peak_mb']} MiB"])
    return out


def head_rows(head: list[dict[str, str]]) -> list[list[str]]:
    """benchmarks/head_grad.py's rows: ms per case and route, with the head's errors."""
    out = []
    for r in head:
        note = f"min {r['min_ms']} max {r['max_ms']} ms"
        if r.get("rel_err_w"):
            note += f"; rel err vs float64 x {r['rel_err_x']} w {r['rel_err_w']} b {r['rel_err_b']}"
        out.append(["head_grad", f"{r['case']} {r['route']}", r["ms"], "ms", note])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--build", default="unknown")
    args = p.parse_args(argv)
    out = args.out
    log = (out / "check.log").read_text(errors="replace") if (out / "check.log").exists() else ""
    rows = env_rows(args.build)
    parts = []
    if (out / "parts.csv").exists():
        for line in (out / "parts.csv").read_text().splitlines():
            name, result, seconds = line.split(",")
            rows.append(["part", name, result, "", f"{seconds} s"])
            parts.append(f"{name} {result} ({seconds} s)")
    rows += test_rows(log)
    kernels = _read_csv(out / "kernels.csv")
    krows, verdicts = kernel_rows(kernels)
    rows += krows
    srows = step_rows(_read_csv(out / "step3d.csv"), _read_csv(out / "step2d.csv"))
    rows += srows
    hrows = head_rows(_read_csv(out / "head_grad.csv"))
    rows += hrows
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "name", "value", "unit", "note"])
        w.writerows(rows)
    env = {r[1]: r[2] for r in rows if r[0] == "env"}
    fails = sum(v.startswith("FAIL") for v in verdicts)
    text = [
        f"gpu {env['gpu']}; driver {env['driver']}; torch {env['torch']}; CUDA {env['cuda']}; "
        f"python {env['python']}; git {env['git']}; {env['date']}",
        f"build: {args.build}",
        "parts: " + "; ".join(parts),
        "tests: " + "; ".join(f"{r[1]} {r[2]}" for r in rows if r[0] == "tests"),
        *(f"{r[1]}: {r[2]} {r[3]}" for r in krows if r[1] == "copy bandwidth"),
        f"kernel targets: {len(verdicts) - fails} PASS, {fails} FAIL",
        *verdicts,
        *(f"{r[0]} {r[1]}: {r[2]} {r[3]} ({r[4]})" for r in srows),
        *(f"{r[0]} {r[1]}: {r[2]} {r[3]} ({r[4]})" for r in hrows),
        "",
        *kernel_table(kernels),
    ]
    (out / "summary.txt").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'summary.csv'} ({len(rows)} rows) and {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
