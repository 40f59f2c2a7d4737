"""What costs lean its task quality, one factor at a time (the issue "The memory floor", item 1).

Each cell (task, row, seed) is one `fulltune train` process at the task config's own recipe (lr 1e-4),
probes off, in runs/factor/TASK/ROW/seedS; a finished cell is read, not rerun (bench/forgetting_study.py's
runner), so the study resumes across sessions. Rows change one thing against the default, or take one
thing back from lean:

    default    bf16-mixed AdamW, clip 1.0 (what `auto` trains here)
    lean       train.memory=lean: pure bf16 weights, 4-bit AdamW, the step in backward (so no clipping),
               activation checkpointing
    lean-clip  lean with the ordinary step and clip 1.0 (the step in backward and no-clipping taken back)
    no-clip    the default without clipping
    bf16       the default in pure bf16 (AdamW, stochastically rounded updates)
    4bit       the default with 4-bit AdamW moments
    in-bwd     the default with the step in backward (no clipping)

RoPE's frequencies, the fifth factor the issue names, are not a row: pure bf16 keeps them in fp32
since 2026-12-07 (model.cast_weights), so every row here runs with the fix.

    .venv/bin/python bench/lean_factors.py [--cells subjects/lean/0,...] [--budget-min M] [--tables-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forgetting_study as fs  # noqa: E402
from common import cpu_flags, cpu_name  # noqa: E402
from study_table import difference  # noqa: E402

from fulltune.evals import records  # noqa: E402
from fulltune.evals.paired import seeds_change  # noqa: E402

OUT = fs.ROOT / "runs" / "factor"
TASKS = {"quickstart": "configs/quickstart.yaml", "subjects": "configs/subjects.yaml"}
COMMON = ["eval.probes=[]", "train.progress=false", "train.tensorboard=false", "train.save_interval=0",
          "train.overwrite=true"]  # fmt: skip
ROWS = {
    "default": [],
    "lean": ["train.memory=lean"],
    "lean-clip": ["train.memory=lean", "train.optimizer_in_backward=false", "optim.grad_clip=1.0"],
    "no-clip": ["optim.grad_clip=0"],
    "bf16": ["train.precision=bf16"],
    "4bit": ["optim.name=adamw4bit"],
    "in-bwd": ["train.optimizer_in_backward=true", "optim.grad_clip=0"],
}
# One seed of every row on both tasks, then seeds 1-2 of the default, lean and lean-clip.
PLAN = [f"{t}/{r}/0" for t in ("subjects", "quickstart") for r in ROWS] + [
    f"{t}/{r}/{s}" for s in (1, 2) for t in ("subjects", "quickstart") for r in ("default", "lean", "lean-clip")
]


def folder(cell: str) -> Path:
    task, row, seed = cell.split("/")
    return OUT / task / row / f"seed{seed}"


def command(cell: str) -> list[str]:
    task, row, seed = cell.split("/")
    out = folder(cell).relative_to(fs.ROOT)
    return ["fulltune", "train", TASKS[task], *COMMON, *ROWS[row], f"train.seed={seed}", f"train.output_dir={out}"]


def summary(cells: list[str]) -> dict:
    """Per task and row: task accuracy over seeds, against the default on the same items, val loss,
    s/step, model-state bytes per parameter and the run's own memory line."""
    out: dict = {}
    for task in TASKS:
        runs = {r: [c for c in cells if c.startswith(f"{task}/{r}/")] for r in ROWS}
        correct = {r: [records.read(folder(c), records.steps(folder(c))[-1])["task"]["correct"] for c in cs]
                   for r, cs in runs.items() if cs}  # fmt: skip
        if not correct:
            continue
        before = records.read(folder(next(c for cs in runs.values() for c in cs)), 0)["task"]["correct"]
        for row, cs in runs.items():
            if not cs:
                continue
            res = [json.loads((folder(c) / "results.json").read_text()) for c in cs]
            state = [sum(r["state_memory"]["measured_per_rank_gb"][0].values()) for r in res]
            out.setdefault(task, {})[row] = {
                "cells": cs,
                "task_after": [r["task_accuracy_final"]["accuracy"] for r in res],
                "change": seeds_change("points", before, correct[row]),
                "vs_default": difference("points", before, correct[row], correct["default"])
                if "default" in correct and row != "default"
                else None,
                "val_loss": [r["final_val_loss"] for r in res],
                "s_per_step": [r["train_time_s"] / r["steps"] for r in res],
                "state_gb": state,
                "memory_error_pct": [(r.get("memory") or {}).get("error_pct") for r in res],
            }
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(s: dict) -> str:
    lines = [f"Measured on {cpu_name()} ({' '.join(cpu_flags())}), 2 cores; task accuracy θ0 → θ* on the "
             "same 200 items, 95 % intervals (seeds, then items)."]  # fmt: skip
    for task, rows in s.items():
        lines += ["", f"**{task}**", "",
                  "| row | seeds | task θ* mean (min) | change from θ0 | against the default | val loss | s/step | "
                  "model state GB | `[memory]` |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for row, r in rows.items():
            ch, vs, after = r["change"], r["vs_default"], r["task_after"]
            lines.append(
                f"| {row} | {len(r['cells'])} | {100 * mean(after):.1f} % ({100 * min(after):.1f}) | "
                f"{ch['change']:+.1f} [{ch['ci95'][0]:+.1f}, {ch['ci95'][1]:+.1f}] | "
                + (f"{vs['change']:+.1f} [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]" if vs else "–")
                + f" | {mean(r['val_loss']):.3f} | {mean(r['s_per_step']):.2f} | {mean(r['state_gb']):.2f} | "
                + ", ".join(f"{e:+.1f} %" for e in r["memory_error_pct"] if e is not None)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(PLAN))
    ap.add_argument("--budget-min", type=float, default=None)
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    for cell in args.cells.split(","):
        if args.tables_only or (folder(cell) / "results.json").is_file():
            continue
        if args.budget_min is not None and time.perf_counter() - started > 60 * args.budget_min:
            print(f"[factors] out of the {args.budget_min:g}-minute budget: {cell} and later cells wait", flush=True)
            break
        fs.run_cell(cell, folder(cell), command(cell))
    s = summary([c for c in PLAN if (folder(c) / "results.json").is_file()])
    (fs.ROOT / "bench" / "results" / "lean_factors.json").write_text(json.dumps(s, indent=1))
    print(table(s))


if __name__ == "__main__":
    main()
