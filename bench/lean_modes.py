"""The modes table: optimiser × precision × step in backward × checkpointing, on the quickstart.

Each row trains SmolLM2-135M on the quickstart's SST-2 chat data (micro-batch 8, seed 0) for a few
steps in its own process (`fulltune train configs/quickstart-2026-11.yaml ...`, no task eval, no probes) and
reads back what the run measured itself:
  - model state bytes per parameter: results.json → state_memory (weights + gradients + optimiser,
    bytes of the tensors after the first update, before the gradients are freed);
  - peak predicted vs measured: results.json → memory (CPU: sampled RSS over the first 3 steps with
    glibc returning freed memory at once);
  - s/step: step 1 alone (warm-up: torch.compile builds torchao's kernels there), and the median of
    the steps after the memory check (steps 5..N; the measured steps run slower by design).

    .venv/bin/python bench/lean_modes.py [--steps 7] [--only LABEL ...] [--out bench/results/lean_modes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import ROOT, quickstart_steps, run_modes

MODES = [  # (label, overrides)
    ("adamw bf16-mixed", []),
    ("adamw fp32", ["train.precision=fp32"]),
    ("adamw bf16", ["train.precision=bf16"]),
    ("sgd bf16-mixed", ["optim.name=sgd"]),
    ("adafactor bf16-mixed", ["optim.name=adafactor"]),
    ("adamw8bit bf16-mixed", ["optim.name=adamw8bit"]),
    ("adamw4bit bf16-mixed", ["optim.name=adamw4bit"]),
    ("adamw8bit bf16", ["optim.name=adamw8bit", "train.precision=bf16"]),
    ("adamw4bit bf16", ["optim.name=adamw4bit", "train.precision=bf16"]),
    ("adamw bf16-mixed ckpt", ["model.activation_checkpointing=true"]),
    ("adamw bf16-mixed in-bwd", ["train.optimizer_in_backward=true", "optim.grad_clip=0"]),
    (
        "adamw4bit bf16 in-bwd",
        ["optim.name=adamw4bit", "train.precision=bf16", "train.optimizer_in_backward=true", "optim.grad_clip=0"],
    ),
    ("lean (adamw4bit bf16 in-bwd ckpt)", ["train.memory=lean"]),
    ("lean, fp32 weights (no bf16 units)", ["train.memory=lean", "train.precision=fp32"]),
    ("floor (apollo_mini on every matrix, bf16 in-bwd ckpt)", ["train.memory=floor"]),
]


def run_mode(label: str, overrides: list[str], steps: int, folder: Path) -> dict:
    out = folder / label.split(" (")[0].replace(" ", "_").replace(",", "")
    t0 = time.perf_counter()
    rows, per_step, stdout = quickstart_steps(label, out, steps, 3, overrides)
    results = json.loads((out / "results.json").read_text())
    state, mem = results["state_memory"], results["memory"]
    m = state["measured_per_rank_gb"][0]
    n_params = 134_515_008
    return {
        "label": label,
        "overrides": overrides,
        "losses": [r["loss"] for r in rows],
        "state_bytes_per_param": 1e9 * (m["params"] + m["grads"] + m["optimizer"]) / n_params,
        "state_gb": m,
        "state_predicted_gb": state["predicted_per_rank_gb"],
        "peak_predicted_gb": mem["predicted_peak_gb"],
        "peak_measured_gb": mem["measured_peak_gb"],
        "peak_error_pct": mem["error_pct"],
        "warmup_s": per_step[0],
        "steady_s_per_step": statistics.median(per_step[4:]) if len(per_step) > 4 else None,
        "wall_s": time.perf_counter() - t0,
        "log_tail": stdout[-1500:],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | model state B/param | peak predicted | peak measured | error | step 1 (warm-up) | s/step steady |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['state_bytes_per_param']:.2f} | {r['peak_predicted_gb']:.2f} GB | "
            f"{r['peak_measured_gb']:.2f} GB | {r['peak_error_pct']:+.1f}% | {r['warmup_s']:.1f} s | "
            f"{r['steady_s_per_step']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lean_modes.json"))
    args = ap.parse_args()
    rows = run_modes(
        MODES,
        args.only,
        lambda label, overrides, folder: run_mode(label, overrides, args.steps, folder),
        lambda r: (
            f"{r['state_bytes_per_param']:.2f} B/param, peak {r['peak_error_pct']:+.1f}%, "
            f"warm-up {r['warmup_s']:.1f} s, steady {r['steady_s_per_step']:.2f} s/step"
        ),
        args.out,
        args.steps,
    )
    print(table(rows))


if __name__ == "__main__":
    main()
