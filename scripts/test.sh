#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite; fetches the embedded default's assets
# on first use for the integration tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
