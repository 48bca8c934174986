#!/usr/bin/env bash
# GPU check, one run of about 9 minutes at most (a 520 s budget and the summary): build segcft (CPU + CUDA modules) against the
# installed torch without network access, run the CUDA tests against the reference, time the
# kernels (against eager pure torch, torch.compile and the copy bandwidth) and the Seg-CFT steps,
# the likelihood head's weight-gradient routes, and write a summary. Everything goes to $OUT
# (default ./out), seven files:
#   check.log     every part's output, one section per part
#   kernels.csv   benchmarks/kernels.py rows (soft_area and area_loss, eager / compile / segcft)
#   step3d.csv    benchmarks/step.py --volumes 128x64x64 rows (batch 8, bf16 autocast)
#   step2d.csv    benchmarks/step.py --shapes 64 192 rows (batch 8, bf16 autocast)
#   head_grad.csv benchmarks/head_grad.py rows (the head alone and the 3D step, per route)
#   summary.csv   section,name,value,unit,note: device, versions, part status and every figure
#   summary.txt   the short version: versions, PASS/FAIL lines, step rates, a markdown kernels table
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh             # on a machine with an NVIDIA GPU
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --dry-run       # every part on the CPU at tiny sizes
#
# Build tools (pybind11, cmake, ninja or make, setuptools, nvcc) are taken from the environment;
# WHEELHOUSE may point at a folder of wheels to install the missing Python ones from; PYTHON
# names the interpreter (default: python, else python3). Each part
# runs under `timeout`; a part that would start past GPU_CHECK_BUDGET_S (default 520 s) is skipped
# with a SKIP line, as is every part named in GPU_CHECK_SKIP (e.g. "tests_cuda step3d" to rerun
# the others within a short lease). The exit status is 0 when every part that ran succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: [OUT=dir] bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PARTS="env build tests_cuda tests_ops kernels_area_loss step3d head_grad kernels_soft_area step2d_64 step2d_192"
for name in ${GPU_CHECK_SKIP:-}; do  # a misspelt part would otherwise run, unnoticed, on a short lease
  [[ " $PARTS " == *" $name "* ]] || { echo "GPU_CHECK_SKIP: unknown part '$name'; expected some of: $PARTS" >&2; exit 2; }
done
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
LOG="$OUT/check.log"
BUDGET="${GPU_CHECK_BUDGET_S:-520}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
START=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
: > "$LOG"
rm -f "$OUT/kernels.csv" "$OUT/step3d.csv" "$OUT/step2d.csv" "$OUT/head_grad.csv" "$OUT/parts.csv"
status=0

say() { echo "$*" | tee -a "$LOG"; }

# part NAME LIMIT_S CMD...: run CMD under timeout (at most the budget left), log its output and
# record NAME,status,seconds in parts.csv (merged into summary.csv at the end).
part() {
  local name=$1 limit=$2
  shift 2
  local elapsed=$((SECONDS - START))
  local left=$((BUDGET - elapsed))
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    say "SKIP $name: named in GPU_CHECK_SKIP"
    echo "$name,skipped,0" >> "$OUT/parts.csv"
    return 0
  fi
  if [ "$left" -lt 20 ]; then
    say "SKIP $name: ${elapsed} s of the ${BUDGET} s budget used"
    echo "$name,skipped,0" >> "$OUT/parts.csv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "===== $name (limit ${limit} s, at ${elapsed} s) ====="
  local t0=$SECONDS rc
  timeout -k 10 "$limit" bash -c '"$@"' bash "$@" >> "$LOG" 2>&1  # bash -c: shell functions too
  rc=$?
  local took=$((SECONDS - t0)) result=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    result=timeout
  elif [ "$rc" -ne 0 ]; then
    result="failed-rc$rc"
  fi
  [ "$result" = ok ] || status=1
  say "----- $name: $result in ${took} s"
  echo "$name,$result,$took" >> "$OUT/parts.csv"
  return "$rc"
}

env_info() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  command -v nvcc && nvcc --version | tail -2
  nproc
}

build_tools() {
  "$PY" -c "import pybind11, setuptools" 2>/dev/null && command -v cmake >/dev/null \
    && { command -v ninja >/dev/null || command -v make >/dev/null; }
}

# The CUDA build: Python build tools from the environment (or WHEELHOUSE), then an editable install
# without build isolation, or failing that an in-place build_ext; says BUILD FAILED otherwise.
build() {
  if ! build_tools && [ -n "${WHEELHOUSE:-}" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" pybind11 cmake ninja setuptools wheel pytest
  fi
  build_tools || echo "build tools incomplete (need pybind11, setuptools, cmake, ninja or make); trying anyway"
  command -v ninja >/dev/null || export CMAKE_GENERATOR="Unix Makefiles"
  export SEGCFT_CUDA=1
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  local arch  # only this card's architecture: the quickest build
  if [ -z "${SEGCFT_CUDA_ARCH:-}" ] \
    && arch="$("$PY" -c "import torch; print('%d%d-real' % torch.cuda.get_device_capability())")"; then
    export SEGCFT_CUDA_ARCH="$arch"
  fi
  echo "SEGCFT_CUDA_ARCH=${SEGCFT_CUDA_ARCH:-default}"
  "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || { echo "pip install -e . failed; trying setup.py build_ext --inplace"; "$PY" setup.py build_ext --inplace; } \
    || { echo "setup.py failed; trying nvcc directly (CUDA module only)"; build_direct segcft; }
  "$PY" -c "import segcft._C" || echo "CPU module segcft._C missing: CPU tensors use the reference"
  if "$PY" -c "import segcft._C_cuda"; then
    echo "BUILD OK"
  else
    echo "BUILD FAILED: segcft._C_cuda does not import (see the compiler output above)"
    return 1
  fi
}

# segcft._C_cuda with nvcc alone (no cmake, ninja or pybind11 package: torch ships pybind11's
# headers), for SEGCFT_CUDA_ARCH's first architecture; into the folder $1.
build_direct() {
  local dest=$1 sm=${SEGCFT_CUDA_ARCH:-90-real} tmp paths suffix
  sm=${sm%%[-;]*}
  tmp=$(mktemp -d)
  paths=$("$PY" -c "import os, sysconfig, torch; print(sysconfig.get_paths()['include'], \
os.path.join(os.path.dirname(torch.__file__), 'include'), sysconfig.get_config_var('EXT_SUFFIX'))") || return 1
  read -r pyinc torchinc suffix <<< "$paths"
  nvcc -O3 --use_fast_math -lineinfo -std=c++17 -gencode "arch=compute_$sm,code=sm_$sm" -Xcompiler -fPIC \
      -Icsrc -c csrc/cuda/soft_area.cu -o "$tmp/soft_area.o" \
    && nvcc -O3 -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden -Icsrc -I"$pyinc" -I"$torchinc" \
      -c csrc/bindings_cuda.cpp -o "$tmp/bindings_cuda.o" \
    && nvcc -shared -cudart static "$tmp/soft_area.o" "$tmp/bindings_cuda.o" -o "$dest/_C_cuda$suffix"
  local rc=$?
  rm -rf "$tmp"
  return $rc
}

# pytest from the environment (or WHEELHOUSE); says TESTS NOT RUN without it.
run_tests() {
  if ! "$PY" -c "import pytest" 2>/dev/null && [ -n "${WHEELHOUSE:-}" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" pytest
  fi
  "$PY" -c "import pytest" || { echo "TESTS NOT RUN: pytest is not installed (WHEELHOUSE may hold its wheel)"; return 1; }
  "$PY" -m pytest -q -rfE -p no:cacheprovider "$@"
}

export -f env_info build_tools build build_direct run_tests
export PY

build_status() { grep -q "^BUILD OK" "$LOG" && echo ok || echo FAILED; }

{ echo "gpu_check $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s git $(git rev-parse --short HEAD 2>/dev/null)"; } >> "$LOG"
part env 60 env_info

if [ "$DRY" = 1 ]; then
  say "SKIP build, tests_cuda, tests_ops: dry run (CPU)"
  for p in build tests_cuda tests_ops; do echo "$p,dry-run,0" >> "$OUT/parts.csv"; done
  DEV=cpu
  KERNEL_ARGS=(--device cpu --cases 2d-2x3x16x16 3d-1x3x8x8x8 --reps 3 --threads 1 --compile-backend eager
               --copy-mb 4 --rotate-mb 0.1)
  STEP3D_ARGS=(--volumes 32x16x16 --batch 1 --reps 1 --threads 1)
  STEP2D_ARGS=(--variants reg seg-fused --batch 1 --reps 1 --threads 1)
  HEAD_ARGS=(--volume 16x8x8 --batch 1 --reps 1 --rounds 1)
  SHAPES2D=(64)
else
  part build 200 build
  [ "$(build_status)" = ok ] || say "BUILD FAILED: the tests below fail and segcft's CUDA rows are the reference"
  timeout -k 5 60 "$PY" -m segcft.ops >> "$LOG" 2>&1
  part tests_cuda 100 run_tests tests/test_ops_cuda.py
  part tests_ops 40 run_tests tests/test_ops.py -k "cuda or loaded"
  DEV=cuda
  KERNEL_ARGS=(--device cuda --cases 2d-16x4x192x192 3d-8x4x128x64x64 3d-2x4x128x256x256 --reps 30)
  STEP3D_ARGS=(--volumes 128x64x64 --batch 8 --reps 5)
  STEP2D_ARGS=(--variants reg seg-fused seg-reference --batch 8 --reps 10)
  HEAD_ARGS=(--volume 128x64x64 --batch 8 --reps 5 --rounds 2)
  SHAPES2D=(64 192)
fi

part kernels_area_loss 150 "$PY" benchmarks/kernels.py "${KERNEL_ARGS[@]}" --ops area_loss --csv "$OUT/kernels.csv"
part step3d 110 "$PY" benchmarks/step.py "${STEP3D_ARGS[@]}" --device "$DEV" \
  --modes reg:bf16 seg:bf16 pos-seg:bf16 pos-seg --profile --out "$OUT/step3d.csv"
part head_grad 60 "$PY" benchmarks/head_grad.py "${HEAD_ARGS[@]}" --device "$DEV" --out "$OUT/head_grad.csv"
part kernels_soft_area 130 "$PY" benchmarks/kernels.py "${KERNEL_ARGS[@]}" --ops soft_area --csv "$OUT/kernels.csv"
for shape in "${SHAPES2D[@]}"; do
  # one process per shape, so a timeout loses one shape's rows only
  part "step2d_$shape" 90 "$PY" benchmarks/step.py --shapes "$shape" "${STEP2D_ARGS[@]}" --device "$DEV" \
    --out "$OUT/step2d_$shape.csv"
  if [ -f "$OUT/step2d_$shape.csv" ]; then
    if [ -f "$OUT/step2d.csv" ]; then tail -n +2 "$OUT/step2d_$shape.csv" >> "$OUT/step2d.csv"
    else cat "$OUT/step2d_$shape.csv" > "$OUT/step2d.csv"; fi
    rm -f "$OUT/step2d_$shape.csv"
  fi
done

say "===== summary (at $((SECONDS - START)) s) ====="
timeout -k 5 30 "$PY" benchmarks/gpu_summary.py --out "$OUT" --build "$([ "$DRY" = 1 ] && echo dry-run || build_status)" \
  >> "$LOG" 2>&1 || { say "summary failed"; status=1; }
rm -f "$OUT/parts.csv"
[ -f "$OUT/summary.txt" ] && cat "$OUT/summary.txt"
say "gpu_check done in $((SECONDS - START)) s, status $status; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
