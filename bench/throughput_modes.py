"""Throughput of the batching modes on the quickstart: padded, length-grouped, packed, packed + compile.

Each row trains SmolLM2-135M on the 2026-11 quickstart (configs/quickstart-2026-11.yaml: SST-2 with
the instruction prompt, micro-batch 8 rows, seed 0) for a few steps in its own process and reads
back what the run logged itself (metrics.jsonl): useful
(non-padding) tok/s, padding fraction, model FLOP/s and MFU against the matmul peak the run
measured at its start (throughput.py). Steady state = the median over the steps after `--skip`
(compile's warm-up and first-step effects left out; step 1 is reported on its own).

    .venv/bin/python bench/throughput_modes.py [--steps 12] [--skip 3] [--only LABEL ...] [--avx2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import ROOT, quickstart_steps, run_modes

MODES = [  # (label, overrides)
    ("padded", []),
    ("group_by_length", ["data.group_by_length=true"]),
    ("packing", ["data.packing=true"]),
    ("packing + compile", ["data.packing=true", "train.compile=true"]),
    ("padded fp32", ["train.precision=fp32"]),
    ("packing fp32", ["data.packing=true", "train.precision=fp32"]),
    ("packing + compile fp32", ["data.packing=true", "train.compile=true", "train.precision=fp32"]),
]


def run_mode(label: str, overrides: list[str], steps: int, skip: int, folder: Path, avx2: bool) -> dict:
    t0 = time.perf_counter()
    rows, per_step, stdout = quickstart_steps(
        label, folder / label.replace(" ", "_").replace("+", ""), steps, 0, overrides, avx2
    )
    steady = rows[skip:]
    peak = next((line for line in stdout.splitlines() if "matmul peak" in line), "")
    return {
        "label": label,
        "overrides": overrides,
        "step1_s": per_step[0],
        "s_per_step": statistics.median(per_step[skip:]),
        "useful_tok_s": statistics.median(r["tokens_per_s"] for r in steady),
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in steady),
        "tflops": statistics.median(r["flops_per_s"] for r in steady) / 1e12,
        "mfu": statistics.median(r["mfu"] for r in steady),
        "peak_line": peak,
        "wall_s": time.perf_counter() - t0,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | useful tok/s | padding | model TFLOP/s | MFU | s/step | step 1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['useful_tok_s']:.0f} | {100 * r['padding_fraction']:.1f}% | "
            f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {r['s_per_step']:.2f} | {r['step1_s']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--avx2", action="store_true", help="cap the instruction set at AVX2 (bench/common.py)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput_modes.json"))
    args = ap.parse_args()
    rows = run_modes(
        MODES,
        args.only,
        lambda label, overrides, folder: run_mode(label, overrides, args.steps, args.skip, folder, args.avx2),
        lambda r: (
            f"{r['useful_tok_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
            f"pad {100 * r['padding_fraction']:.1f}% | {r['peak_line']}"
        ),
        args.out,
        args.steps,
        args.avx2,
    )
    print(table(rows))


if __name__ == "__main__":
    main()
