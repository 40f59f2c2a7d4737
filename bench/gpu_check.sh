#!/usr/bin/env bash
# The GPU check: every CUDA path in one call of ≤ 8 minutes (bench/gpu_check.py says what each step
# does). Never write a GPU number into the docs that this did not print.
#
#   here, once:  .venv/bin/python bench/gpu_check.py carry gpu_carry     # data + tokenizer, 3.5 MB
#                the wheels the GPU image lacks into .whl/ (docs/benchmarks.md, "The GPU check")
#   there:       bash bench/gpu_check.sh            (device run, carry [".whl", "gpu_carry"])
#   CI, on CPU:  bash bench/gpu_check.sh --dry-run  (tests/test_gpu_check.py: a tiny model, CUDA-only steps skipped)
#
# Models and runs stay in a scratch folder; $OUT (default bench/results/gpu_check) gets three files:
# gpu_check.json, report.md and gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then  # offline: the carried wheels, for the image's Python
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d gpu_carry/config ] && export FULLTUNE_HOME="$PWD/gpu_carry"
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_check.py run "$OUT" "$@"
