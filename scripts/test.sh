#!/usr/bin/env bash
# Compile csrc/ with nvcc when it is on the PATH (scripts/compile_kernels.sh), set up (scripts/setup.sh:
# .venv, and PoCL when it can; SLURM for its test when it can) and run the whole suite: unit tests, then the MPI tests on 2 and 4 ranks.
# Exits non-zero if a kernel fails to compile or any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
echo "== nvcc compile check of csrc/ =="
bash scripts/compile_kernels.sh || { status=1; echo "KERNEL COMPILE FAILED"; }
bash scripts/setup.sh
bash scripts/install_slurm.sh || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
MPIEXEC=.venv/bin/mpiexec
# which kernel paths this run exercises (the OpenCL kernel tests skip, saying why, when OpenCL is unusable)
$PY -c "from commopt import kernels; print(*kernels.describe(), sep=chr(10))" || true
echo "== unit and single-host tests =="
timeout 1800 $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi || status=1
for n in 2 4; do
  echo "== MPI tests on $n ranks =="
  timeout 1200 $MPIEXEC -n $n $PY -m pytest -q -p no:cacheprovider --with-mpi tests/mpi || status=1
done
if [ $status -ne 0 ]; then echo "TESTS FAILED"; fi
exit $status
