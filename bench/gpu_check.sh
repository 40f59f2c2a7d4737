#!/usr/bin/env bash
# The GPU check: one command, ≤ 8 minutes on one GPU. Not yet run: no GPU was lent to the sessions
# that wrote it. Never write a GPU number into the docs that this did not print.
#
#   here (CPU):  .venv/bin/python bench/gpu_check.py carry gpu_carry    # data + tokenizer, 3.5 MB
#                pip download --no-deps ... datasets dill multiprocess torchao  → .whl/ (device README)
#   there:       bash bench/gpu_check.sh gpu_carry                        # OUT=... for the results
#
# 1. a few quickstart steps as one process on CUDA;
# 2. the same under torchrun --nproc-per-node=1: FSDP2 over NCCL, the collectives' device class of bug,
#    and the same numerics as one process (the losses must agree);
# 3. a random-init SmolLM2-1.7B-shaped Llama at seq 2048 with packing and compile: tok/s, MFU, CUDA peak
#    against the estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-gpu_carry}
OUT=${OUT:-bench/results/gpu_check}
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FULLTUNE_HOME="$PWD/$CARRY" HF_HUB_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY bench/gpu_check.py models "$OUT/models" "$CARRY"
COMMON=(train.device=cuda train.progress=false train.save_interval=5 eval.probes=[] eval.task_file= data.val_fraction=0
        train.memory_steps=3)
Q=configs/quickstart.yaml
timeout 150 $PY -m fulltune train $Q model.path="$OUT/models/small" train.output_dir="$OUT/one" train.max_steps=10 \
  "${COMMON[@]}" 2>&1 | tee "$OUT/one.log"
timeout 150 $PY -m torch.distributed.run --standalone --nproc-per-node=1 -m fulltune train $Q \
  model.path="$OUT/models/small" train.output_dir="$OUT/torchrun1" train.max_steps=10 "${COMMON[@]}" 2>&1 | tee "$OUT/torchrun1.log"
timeout 240 $PY -m fulltune train $Q model.path="$OUT/models/large" train.output_dir="$OUT/large" train.max_steps=20 \
  data.max_seq_len=2048 data.packing=true train.compile=true train.micro_batch_size=4 schedule.warmup_steps=2 \
  "${COMMON[@]}" train.save_interval=0 2>&1 | tee "$OUT/large.log"
$PY bench/gpu_check.py report "$OUT" | tee "$OUT/report.md"
