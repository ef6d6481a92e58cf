#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_80 and sm_90 (-fmad=false, as NVRTC compiles them at run time),
# so that a broken kernel fails CI on a machine without a GPU. Skipped (exit 0) when nvcc is not on the PATH.
# NVCC=/path/to/nvcc, COMMOPT_ARCHS="80 90" and COMMOPT_CSRC=dir override the compiler, architectures and sources.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${COMMOPT_ARCHS:-80 90}
CSRC=${COMMOPT_CSRC:-csrc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_kernels: nvcc not on the PATH; the nvcc compile check of csrc/ is skipped (the OpenCL/PoCL tests still compile and run every kernel)"
  exit 0
fi
shopt -s nullglob
sources=("$CSRC"/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_kernels: FAILED: no $CSRC/*.cu found" >&2
  exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/commopt-nvcc.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
version=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n1)
failed=()
n=0
for arch in $ARCHS; do
  for src in "${sources[@]}"; do
    obj="$tmp/$(basename "$src" .cu).sm_$arch.o"
    if ! log=$("$NVCC" -arch="sm_$arch" -fmad=false -I"$CSRC" -c "$src" -o "$obj" 2>&1); then
      echo "compile_kernels: $src for sm_$arch FAILED:" >&2
      echo "$log" >&2
      failed+=("$src@sm_$arch")
    else
      n=$((n + 1))
      [ -n "$log" ] && echo "$log" >&2  # warnings
    fi
  done
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "compile_kernels: FAILED ${#failed[@]} of $(( ${#sources[@]} * $(echo $ARCHS | wc -w) )) compiles (nvcc ${version:-?}): ${failed[*]}" >&2
  exit 1
fi
echo "compile_kernels: ${#sources[@]} $CSRC/*.cu files compiled for sm_${ARCHS// /, sm_} with nvcc ${version:-?} -fmad=false ($n compiles, all ok)"
