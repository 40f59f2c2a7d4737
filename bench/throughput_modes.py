"""Throughput of the batching modes on the quickstart: padded, length-grouped, packed, packed + compile.

Each row trains SmolLM2-135M on the quickstart's SST-2 chat data (micro-batch 8 rows, seed 0) for a
few steps in its own process and reads back what the run logged itself (metrics.jsonl): useful
(non-padding) tok/s, padding fraction, model FLOP/s and MFU against the matmul peak the run
measured at its start (throughput.py). Steady state = the median over the steps after `--skip`
(compile's warm-up and first-step effects left out; step 1 is reported on its own).

    .venv/bin/python bench/throughput_modes.py [--steps 12] [--skip 3] [--only LABEL ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODES = [  # (label, overrides)
    ("padded", []),
    ("group_by_length", ["data.group_by_length=true"]),
    ("packing", ["data.packing=true"]),
    ("packing + compile", ["data.packing=true", "train.compile=true"]),
    ("padded fp32", ["train.precision=fp32"]),
    ("packing fp32", ["data.packing=true", "train.precision=fp32"]),
]


def run_mode(label: str, overrides: list[str], steps: int, skip: int, folder: Path, env: dict) -> dict:
    out = folder / label.replace(" ", "_").replace("+", "")
    cmd = [sys.executable, "-m", "fulltune", "train", str(ROOT / "configs" / "quickstart.yaml"),
           f"train.output_dir={out}", f"train.max_steps={steps}", "train.progress=false", "train.save_interval=0",
           "train.val_interval=0", "data.val_fraction=0", "eval.task_file=", "eval.probes=[]", "train.memory_steps=0",
           "data.packing=false", "train.micro_batch_size=8",  # measured before the quickstart packed; each mode sets its own
           *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    times = [r["elapsed_s"] for r in rows]
    per_step = [b - a for a, b in zip([0.0] + times, times)]
    steady = rows[skip:]
    peak = next((line for line in proc.stdout.splitlines() if "matmul peak" in line), "")
    return {"label": label, "overrides": overrides, "step1_s": per_step[0],
            "s_per_step": statistics.median(per_step[skip:]),
            "useful_tok_s": statistics.median(r["tokens_per_s"] for r in steady),
            "padding_fraction": statistics.mean(r["padding_fraction"] for r in steady),
            "tflops": statistics.median(r["flops_per_s"] for r in steady) / 1e12,
            "mfu": statistics.median(r["mfu"] for r in steady),
            "sequences_per_step": rows[-1]["target_tokens_seen"] / len(rows),  # targets per step, for scale
            "peak_line": peak, "wall_s": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    lines = ["| mode | useful tok/s | padding | model TFLOP/s | MFU | s/step | step 1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['useful_tok_s']:.0f} | {100 * r['padding_fraction']:.1f}% | "
                     f"{r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {r['s_per_step']:.2f} | {r['step1_s']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput_modes.json"))
    args = ap.parse_args()
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in MODES:
            if args.only and label not in args.only:
                continue
            rows.append(run_mode(label, overrides, args.steps, args.skip, Path(tmp), env))
            print(f"{label}: {rows[-1]['useful_tok_s']:.0f} tok/s, MFU {100 * rows[-1]['mfu']:.1f}%, "
                  f"pad {100 * rows[-1]['padding_fraction']:.1f}% | {rows[-1]['peak_line']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_flags": flags, "steps": args.steps, "rows": rows}, indent=1))
    print(f"CPU flags: {' '.join(flags)}\n\n{table(rows)}")


if __name__ == "__main__":
    main()
