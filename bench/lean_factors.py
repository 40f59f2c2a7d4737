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
    lean-2pass lean with clip 1.0 in backward: a first forward and backward measure the norm, the second
               applies the clipped updates (optim/in_backward.py): the ordinary clipped step's math

RoPE's frequencies, the fifth factor the issue names, are not a row: pure bf16 keeps them in fp32
since 2026-12-07 (model.cast_weights), so every row here runs with the fix.

    .venv/bin/python bench/lean_factors.py [--cells subjects/lean/0,...] [--budget-min M] [--tables-only]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forgetting_study as fs  # noqa: E402
from common import cpu_flags, cpu_name  # noqa: E402
from study_table import difference  # noqa: E402

from fulltune.evals import records  # noqa: E402
from fulltune.evals.paired import seeds_change  # noqa: E402

OUT = fs.ROOT / "runs" / "factor"
KEPT = fs.ROOT / "bench" / "results" / "factor"
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
    "lean-2pass": ["train.memory=lean", "optim.grad_clip=1.0"],
}
# One seed of every row on both tasks, then seeds 1-2 of the default, lean, lean-clip and lean-2pass. The
# first session's cells (seed 0 on subjects of default, lean, lean-clip, no-clip, in-bwd) lived only in
# runs/: their numbers are in docs/memory.md, their records lost; the plan reruns them.
PLAN = [f"{t}/{r}/0" for t in ("subjects", "quickstart") for r in ROWS] + [
    f"{t}/{r}/{s}"
    for s in (1, 2)
    for t in ("subjects", "quickstart")
    for r in ("default", "lean", "lean-clip", "lean-2pass")
]


def folder(cell: str) -> Path:
    task, row, seed = cell.split("/")
    return OUT / task / row / f"seed{seed}"


def command(cell: str) -> list[str]:
    task, row, seed = cell.split("/")
    out = folder(cell).relative_to(fs.ROOT)
    return ["fulltune", "train", TASKS[task], *COMMON, *ROWS[row], f"train.seed={seed}", f"train.output_dir={out}"]


def kept(cell: str) -> Path:
    """A finished cell's numbers, kept in git: a fresh checkout goes on without rerunning it."""
    task, row, seed = cell.split("/")
    return KEPT / task / row / f"seed{seed}.json"


def keep(cell: str) -> dict:
    """Read a finished run once (its records and results.json) and keep what the table needs."""
    if kept(cell).is_file():
        return json.loads(kept(cell).read_text())
    run = folder(cell)
    r = json.loads((run / "results.json").read_text())
    out = {
        "before": records.read(run, 0)["task"]["correct"],
        "after": records.read(run, records.steps(run)[-1])["task"]["correct"],
        "task_after": r["task_accuracy_final"]["accuracy"],
        "val_loss": r["final_val_loss"],
        "s_per_step": r["train_time_s"] / r["steps"],
        "state_gb": sum(r["state_memory"]["measured_per_rank_gb"][0].values()),
        "memory_error_pct": (r.get("memory") or {}).get("error_pct"),
    }
    kept(cell).parent.mkdir(parents=True, exist_ok=True)
    kept(cell).write_text(json.dumps(out) + "\n")
    return out


def done(cell: str) -> bool:
    return kept(cell).is_file() or (folder(cell) / "results.json").is_file()


def summary(cells: list[str]) -> dict:
    """Per task and row: task accuracy over seeds, against the default on the same items, val loss,
    s/step, model-state bytes per parameter and the run's own memory line."""
    out: dict = {}
    for task in TASKS:
        runs = {r: [keep(c) for c in cells if c.startswith(f"{task}/{r}/")] for r in ROWS}
        runs = {r: cs for r, cs in runs.items() if cs}
        if not runs:
            continue
        correct = {r: [c["after"] for c in cs] for r, cs in runs.items()}
        for row, cs in runs.items():
            before = cs[0]["before"]  # θ0 scored in the row's precision: pure bf16 rows read 25.5 %, the others 24.5 %
            assert all(c["before"] == before for c in cs), f"{task}/{row}: θ0's records differ between seeds"
            out.setdefault(task, {})[row] = {
                "cells": [c for c in cells if c.startswith(f"{task}/{row}/")],
                "task_after": [c["task_after"] for c in cs],
                "change": seeds_change("points", before, correct[row]),
                "vs_default": difference("points", before, correct[row], correct["default"])
                if "default" in correct and row != "default"
                else None,
                **{k: [c[k] for c in cs] for k in ("val_loss", "s_per_step", "state_gb", "memory_error_pct")},
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
    if not args.tables_only:
        run = lambda c: fs.run_cell(c, folder(c), command(c)) and keep(c)  # noqa: E731
        fs.run_cells(args.cells.split(","), done=done, run=run, budget_min=args.budget_min)
    s = summary([c for c in args.cells.split(",") if done(c)])
    (fs.ROOT / "bench" / "results" / "lean_factors.json").write_text(json.dumps(s, indent=1))
    print(table(s))


if __name__ == "__main__":
    main()
