#!/usr/bin/env bash
# Create ./.venv with commopt and its test tools (CPU torch, MPICH + mpi4py from PyPI, pyopencl), and
# install PoCL (an OpenCL CPU driver) when it can, so that the csrc/ kernels run in the tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch is pinned to a CPU build here; override with TORCH_SPEC (e.g. TORCH_SPEC="torch" for your CUDA build)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# PoCL: only as root with apt-get and when no OpenCL driver (ICD) is registered yet. Never fails the
# setup: without an OpenCL device the kernel tests on the CPU skip, and say why.
install_pocl() {
  if compgen -G "${OCL_ICD_VENDORS:-/etc/OpenCL/vendors}/*.icd" >/dev/null; then
    return 0  # an OpenCL platform is already registered (PoCL, or a GPU vendor's)
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: no OpenCL driver found and not root: PoCL not installed (the OpenCL kernel tests will skip;" \
         "install Debian/Ubuntu's pocl-opencl-icd to run them)"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no OpenCL driver found and no apt-get: PoCL not installed (the OpenCL kernel tests will skip)"
    return 0
  fi
  echo "setup: installing PoCL (apt-get install pocl-opencl-icd) so the csrc/ kernels run on the CPU"
  export DEBIAN_FRONTEND=noninteractive
  if timeout 900 apt-get install -y -q pocl-opencl-icd >/tmp/commopt-pocl-install.log 2>&1; then
    echo "setup: PoCL installed"
    return 0
  fi
  echo "setup: apt-get install failed; retrying after apt-get update"
  if timeout 900 apt-get update -q >>/tmp/commopt-pocl-install.log 2>&1 \
     && timeout 900 apt-get install -y -q pocl-opencl-icd >>/tmp/commopt-pocl-install.log 2>&1; then
    echo "setup: PoCL installed"
  else
    echo "setup: could not install PoCL (last lines of /tmp/commopt-pocl-install.log below); the OpenCL kernel tests will skip"
    tail -n 5 /tmp/commopt-pocl-install.log | sed 's/^/  /' || true
  fi
  return 0
}
install_pocl || echo "setup: PoCL step failed unexpectedly; continuing without it"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import commopt, mpi4py, pytest_mpi, pytest_timeout, pyopencl" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.commopt-installed ]; then
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.commopt-installed
fi
