#!/usr/bin/env bash
# GPU check: build segcft (CPU + CUDA modules) against the installed torch without network
# access, run the CUDA tests and the kernel benchmark, and write CSV and logs to $OUT.
#   OUT=/path/to/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
status=0

{
  nvidia-smi || true
  python -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.log" 2>&1

# Build tools must already be installed (no network); WHEELHOUSE may point at local wheels.
if ! python -c "import pybind11, cmake, ninja, setuptools" 2>/dev/null; then
  if [ -n "${WHEELHOUSE:-}" ]; then
    python -m pip install --no-index --find-links "$WHEELHOUSE" pybind11 cmake ninja setuptools wheel >> "$OUT/env.log" 2>&1
  else
    echo "missing build tools (pybind11, cmake, ninja, setuptools); set WHEELHOUSE to a folder of wheels"; exit 1
  fi
fi

export SEGCFT_CUDA=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed, see $OUT/build.log"; tail -40 "$OUT/build.log"; exit 1
fi
python -m segcft.ops > "$OUT/doctor.log" 2>&1 || status=1
cat "$OUT/doctor.log"

python -m pytest tests/test_ops.py -q -k "cuda or loaded" -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1 || status=1
tail -5 "$OUT/tests_cuda.log"

python benchmarks/kernels.py --device cuda --reps 30 --csv "$OUT/results.csv" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"
exit $status
