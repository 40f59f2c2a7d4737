"""optim.name muon, adam_mini, galore, apollo and apollo_mini against adamw on SmolLM2-135M (the embedded
default): CPU time per step, the
optimiser's state bytes (measured, and the estimator's), and what each does to the loss of a fixed
batch over a few steps (one batch, not a quality claim).

One thread, fp32, lr 1e-4, the quickstart's first 4 packed rows as one micro-batch, 6 steps (the
first is warm-up), median CPU time per step; AdamW first and last. Writes bench/results/optimizer_step.json.

    .venv/bin/python bench/optimizer_step.py
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, cpu_name, print_table, save_results  # noqa: E402
from kl_reference_cost import examples  # noqa: E402

from fulltune.config import ModelConfig, OptimConfig  # noqa: E402
from fulltune.data.loader import collate  # noqa: E402
from fulltune.memory.estimate import optimizer_state_bytes  # noqa: E402
from fulltune.memory.measure import state_bytes  # noqa: E402
from fulltune.memory.spec import spec_from_config  # noqa: E402
from fulltune.model import load_theta0  # noqa: E402
from fulltune.optim.param_groups import build_optimizer  # noqa: E402
from fulltune.train import train_step  # noqa: E402

STEPS = 6


def run(name: str) -> dict:
    model, tokenizer, _ = load_theta0(ModelConfig(path="default"))
    batch = collate(examples(tokenizer), pad_id=0)
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-4))
    times, losses = [], []
    for _ in range(STEPS):
        t = time.process_time()
        losses.append(train_step(model, opt, [batch], contextlib.nullcontext, grad_clip=1.0).loss)
        times.append(time.process_time() - t)
    spec = spec_from_config(model.config, "SmolLM2-135M")
    measured = state_bytes(model, opt)["optimizer"]
    estimated = optimizer_state_bytes(spec, name, "fp32")
    n = spec.n_params
    return {"optimizer": name, "step_s": statistics.median(times[1:]), "state_B_per_param": measured / n,
            "estimate_B_per_param": estimated / n, "losses": losses}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(n) for n in ("adamw", "muon", "adam_mini", "galore", "apollo", "apollo_mini", "adamw")]
    print(f"{cpu_name()} ({' '.join(cpu_flags())}), 1 thread, torch {torch.__version__}\n")
    lines = [
        [r["optimizer"], f"{r['step_s']:.2f}", f"{r['state_B_per_param']:.3f}", f"{r['estimate_B_per_param']:.3f}",
         f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}"]
        for r in rows
    ]  # fmt: skip
    head = ["optim.name", "CPU s / step", "state B/param measured", "estimated", "loss at steps 1 → 6"]
    print_table(head, "lrrrl", lines)
    save_results("optimizer_step", rows, threads=1)


if __name__ == "__main__":
    main()
