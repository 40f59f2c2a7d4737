#!/usr/bin/env bash
# Set up (scripts/setup.sh), install Debian's chromium for the report test if missing, check the format and
# lint (ruff), and run the whole test suite; fetches the embedded default's assets on first use for the integration tests.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the extras' real packages, for tests/test_trackers.py (train.loggers mlflow / wandb), tests/test_lmeval.py and tests/test_export.py
.venv/bin/pip install --disable-pip-version-check -q -e ".[mlflow,wandb,lmeval,gguf]" 2>&1 | grep -v "^WARNING: Location" || true
if ! command -v chromium >/dev/null 2>&1; then  # tests/test_report.py opens report.html in headless Chromium
  echo "[test] installing chromium (Debian's package) for the report test"
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get install -y -q chromium >/dev/null 2>&1 || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
fi
echo "[test] ruff format --check and ruff check"
.venv/bin/ruff format --check --quiet . || { echo "[test] not formatted: run .venv/bin/ruff format"; exit 1; }
.venv/bin/ruff check --quiet .
.venv/bin/python -m fulltune.runtime  # the CPU, its flags, inductor's ISA and what precision auto picks
.venv/bin/python -m pytest -q "$@"
