#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole suite: unit tests, then the MPI tests on 2 and 4 ranks.
# Exits non-zero if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
MPIEXEC=.venv/bin/mpiexec
status=0
echo "== unit and single-host tests =="
timeout 1800 $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi || status=1
for n in 2 4; do
  echo "== MPI tests on $n ranks =="
  timeout 1200 $MPIEXEC -n $n $PY -m pytest -q -p no:cacheprovider --with-mpi tests/mpi || status=1
done
if [ $status -ne 0 ]; then echo "TESTS FAILED"; fi
exit $status
