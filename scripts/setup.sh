#!/usr/bin/env bash
# Set up fulltune in ./.venv on a fresh machine: torch first, then the package and its deps.
# FULLTUNE_TORCH overrides the torch requirement (default torch==2.13.0, the CPU build this
# project's machines carry; on a GPU machine use e.g. FULLTUNE_TORCH=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${FULLTUNE_TORCH:-torch==2.13.0}"
  pip install --disable-pip-version-check "${FULLTUNE_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing fulltune and its dependencies into .venv"
pip install --disable-pip-version-check -q -e ".[dev,optimizers]"
python -c "import torch, transformers; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}')"
