#!/usr/bin/env bash
# Create ./.venv with commopt and its test tools (CPU torch, MPICH + mpi4py from PyPI). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is pinned to a CPU build here; override with TORCH_SPEC (e.g. TORCH_SPEC="torch" for your CUDA build)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import commopt, mpi4py, pytest_mpi, pytest_timeout" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.commopt-installed ]; then
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.commopt-installed
fi
