#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run `commopt demo`: a small multi-rank CPU training, dense DDP vs compressed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/commopt demo "$@"
