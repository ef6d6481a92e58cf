#!/usr/bin/env bash
# The GPU checks of issue 9 in one short run (a rented GPU machine, no internet; under 8 minutes):
#   1. what is there: nvidia-smi, a Python with torch + CUDA, CuPy (NVRTC compiles a kernel), pytest;
#      if any is missing it says which and stops (exit 3) -- nothing here installs anything
#   2. commopt info
#   3. nvcc compile check of csrc/ (scripts/compile_kernels.sh; skipped without nvcc)
#   4. the GPU tests: pytest tests/test_gpu.py tests/kernels/test_kernels_gpu.py (those that exist)
#   5. experiments/bench_kernels.py on cuda (cuda kernels vs the torch reference path, 1M/25M/100M,
#      0.1%/1%/10%), with the issue's targets as PASS/MISS lines
# Everything goes under ${OUT:-/tmp/gpu_out}: summary.txt (read this first), env.txt, info.txt,
# compile.txt, pytest_gpu.txt, bench_kernels.log and kernels_<device-tag>.{md,csv}.
# PYTHON=/path/to/python picks the interpreter (default: the first of .venv/bin/python, python3, python
# that has torch with CUDA). Exit status: 0 all passed, 1 a check failed, 3 something is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)
say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo copy, installed or not
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset COMMOPT_KERNELS  # auto: CUDA tensors run the CUDA kernels

say "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) in $PWD (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"

# -- 1. what is there -----------------------------------------------------------------------------
{
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "== nvcc"; command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not on the PATH"
} >"$OUT/env.txt" 2>&1

PY=""
cands=()
[ -n "${PYTHON:-}" ] && cands+=("$PYTHON")
cands+=(.venv/bin/python python3 python)
for c in "${cands[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
  if "$c" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    PY=$c; break
  fi
done
missing=()
if [ -z "$PY" ]; then
  for c in "${cands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    echo "== $c" >>"$OUT/env.txt"
    "$c" -c "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda, 'cuda available', torch.cuda.is_available())" >>"$OUT/env.txt" 2>&1 \
      || echo "   (no torch)" >>"$OUT/env.txt"
  done
  missing+=("a Python with torch built for CUDA that sees the GPU (tried: ${cands[*]}; see env.txt)")
else
  "$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA build", torch.version.cuda, "device", torch.cuda.get_device_name(0))
EOF
  if ! "$PY" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import cupy, torch
print("cupy", cupy.__version__)
k = cupy.RawKernel(r'extern "C" __global__ void f(float* x) { x[threadIdx.x] += 1.0f; }', "f")
x = cupy.zeros(32, dtype=cupy.float32)
k((1,), (32,), (x,))
assert float(x.sum()) == 32.0
print("cupy NVRTC: compiled and ran a kernel")
EOF
  then
    missing+=("CuPy that compiles with NVRTC (pip install cupy-cuda12x, the 'cuda' extra; see env.txt)")
  fi
  "$PY" -c "import pytest" 2>/dev/null || missing+=("pytest (pip install pytest)")
  "$PY" -c "import numpy" 2>/dev/null || missing+=("numpy")
fi
if [ ${#missing[@]} -ne 0 ]; then
  for m in "${missing[@]}"; do say "MISSING: $m"; done
  say "gpu_check: stopped before the checks; nothing was run on the GPU ($(elapsed))"
  exit 3
fi
say "python: $PY ($("$PY" -c 'import torch, cupy; print("torch", torch.__version__, "/ CUDA", torch.version.cuda, "/ cupy", cupy.__version__, "/", torch.cuda.get_device_name(0))'))"

status=0
step() {  # step NAME TIMEOUT LOG CMD...: run, log, record the result
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local what="ok"
  [ $rc -eq 124 ] && what="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (rc=$rc)"
  [ $rc -ne 0 ] && status=1
  say "$name: $what in $(( $(date +%s) - t ))s (log: $(basename "$log"))"
  return $rc
}

# -- 2. commopt info --------------------------------------------------------------------------------
step "commopt info" 120 "$OUT/info.txt" "$PY" -m commopt info
sed -n '/^kernels:/,/cuda kernels:/p' "$OUT/info.txt" | sed 's/^/  /' | tee -a "$SUMMARY"

# -- 3. nvcc compile check --------------------------------------------------------------------------
step "compile_kernels" 150 "$OUT/compile.txt" bash scripts/compile_kernels.sh
tail -n 1 "$OUT/compile.txt" | sed 's/^/  /' | tee -a "$SUMMARY"

# -- 4. GPU tests -----------------------------------------------------------------------------------
tests=()
for f in tests/test_gpu.py tests/kernels/test_kernels_gpu.py; do
  if [ -f "$f" ]; then tests+=("$f"); else say "note: $f not in this copy of the repo; not run"; fi
done
if [ ${#tests[@]} -ne 0 ]; then
  step "pytest ${tests[*]}" 240 "$OUT/pytest_gpu.txt" "$PY" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
  tail -n 1 "$OUT/pytest_gpu.txt" | sed 's/^/  /' | tee -a "$SUMMARY"
  grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/pytest_gpu.txt" | head -n 20 | sed 's/^/  /' | tee -a "$SUMMARY"
fi

# -- 5. benchmark -----------------------------------------------------------------------------------
step "bench_kernels" 210 "$OUT/bench_kernels.log" "$PY" experiments/bench_kernels.py --device cuda \
  --sizes 1M,25M,100M --densities 0.1%,1%,10% --repeats 10 --warmup 3 --out "$OUT/"
grep -E "^(TARGET|bench_kernels: )" "$OUT/bench_kernels.log" | sed 's/^/  /' | tee -a "$SUMMARY"
grep -E "same=NO" "$OUT/bench_kernels.log" | sed 's/^/  DIFFERS: /' | tee -a "$SUMMARY"

say "gpu_check: $([ $status -eq 0 ] && echo 'all steps ok' || echo 'SOME STEPS FAILED') in $(elapsed); outputs in $OUT"
exit $status
