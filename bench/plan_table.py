"""The planner's answer for each preset model × GPU: the smallest setup that fits, as overrides.

    .venv/bin/python bench/plan_table.py [--batch 1] [--seq 2048]

Prints a markdown table (docs/memory.md): per cell, the estimated peak of the first setup that fits
and the savers it needed (ckpt = activation checkpointing, bf16 = pure bf16, bwd = step in backward,
8bit / 4bit = low-bit AdamW, act-off / opt-off = activation / optimiser offload to CPU, mb1 = micro-batch 1),
or "—" where nothing fulltune trains fits on one GPU.
"""

from __future__ import annotations

import argparse

from fulltune.memory.estimate import TrainSetup
from fulltune.memory.gpus import GPUS
from fulltune.memory.plan import plan
from fulltune.memory.spec import load_spec

MODELS = [
    "smollm2-135m",
    "qwen2.5-0.5b",
    "llama3.2-1b",
    "qwen2.5-1.5b",
    "smollm2-1.7b",
    "gemma2-2b",
    "llama3.2-3b",
    "qwen2.5-7b",
    "llama3.1-8b",
]
GPU_COLUMNS = ["rtx4090", "l4", "a100-40gb", "a100-80gb", "h100", "h200", "b200"]
SHORT = {
    "model.activation_checkpointing": "ckpt",
    "train.precision": "bf16",
    "train.optimizer_in_backward": "bwd",
    "model.activation_offload": "act-off",
    "optim.cpu_offload": "opt-off",
    "train.micro_batch_size": "mb1",
    "optim.project_embeddings": "all-matrices",
}


def cell(p) -> str:
    if p.overrides is None:
        return "—"
    if not p.overrides:
        return "fits as is"
    names = [SHORT[k] for k in p.overrides if k in SHORT]
    if "optim.name" in p.overrides:
        names.append(p.overrides["optim.name"].replace("adamw", ""))
    return " + ".join(names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    base = TrainSetup(micro_batch=args.batch, seq_len=args.seq, precision="bf16-mixed")
    print(
        f"micro-batch {args.batch} × seq {args.seq}, starting from bf16-mixed AdamW (what auto trains on these GPUs)\n"
    )
    print("| model | params | " + " | ".join(GPUS[g][0] for g in GPU_COLUMNS) + " |")
    print("| --- | ---: | " + " | ".join("---" for _ in GPU_COLUMNS) + " |")
    for name in MODELS:
        spec = load_spec(name)
        cells = [cell(plan(spec, g, 1, base)) for g in GPU_COLUMNS]
        print(f"| {name} | {spec.n_params / 1e9:.2f}B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
