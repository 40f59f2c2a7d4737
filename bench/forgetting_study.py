"""The forgetting study, with statistics: a hot baseline and each mitigation, old and new, over seeds,
on two tasks, every change paired on the same items with its 95 % interval.

Each cell (task, mitigation, seed) is one `fulltune train` run in its own process, in
runs/study/TASK/ROW/seedS (WiSE-FT: `fulltune interpolate` at α = 0.5 on the baseline of the same
seed). A cell that finished (results.json / interpolate.json) is read, not rerun: the study resumes
where it stopped, across sessions: each finished cell's per-item signals are kept in git
(bench/results/study/TASK/ROW/seedS.json), so a fresh checkout goes on too. `--budget-min M` starts
no new cell after M minutes.

Tasks: sst2 (configs/quickstart.yaml at lr 3e-4 for 3 epochs: 210 steps, the quickstart run hot) and
subjects (configs/subjects.yaml at lr 3e-4, 1 epoch of 2 × 512-token packed rows, the second task);
boolq (configs/boolq.yaml at lr 3e-4, 79 steps) is the second task it replaced.
Every run scores 200 items per multiple-choice probe and 80 per code probe, θ0 from the cache.

The tables (bench/study_table.py) go to docs/forgetting.md between the BENCH markers, the numbers
to bench/results/forgetting_study.json.

    .venv/bin/python bench/forgetting_study.py [--cells sst2/baseline/0,...] [--budget-min 150] [--no-write]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_env, cpu_flags, cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "study"
KEPT = ROOT / "bench" / "results" / "study"
TASKS = {
    "sst2": ["configs/quickstart.yaml", "optim.lr=3e-4", "train.epochs=3"],
    "boolq": ["configs/boolq.yaml", "optim.lr=3e-4"],
    "subjects": ["configs/subjects.yaml", "optim.lr=3e-4"],
}
COMMON = [
    "eval.probe_items=200",
    "eval.probe_code_items=80",
    "train.progress=false",
    "train.overwrite=true",
    "train.tensorboard=false",
    "train.save_interval=0",
]
REPLAY = "data.replay=[builtin:arc_easy,builtin:piqa,builtin:sciq]"
# name: (old or new, overrides, what it is)
ROWS = {
    "baseline": ("–", [], "the hot recipe, nothing against forgetting"),
    "low-lr": ("old", ["optim.lr=5e-5"], "a sixth of the learning rate"),
    "l2sp": ("old", ["anchor.method=l2sp", "anchor.lam=0.1"], "L2-SP toward θ0, λ 0.1"),
    "mix": ("old", ["data.general=[builtin:lambada]", "data.mix_ratio=0.1"], "10 % general text (LAMBADA)"),
    "wise": ("old", [], "WiSE-FT: the baseline's weights halfway back to θ0 (α 0.5), after training"),
    "wise-replay": ("new + old", [], "WiSE-FT (α 0.5) of the replay run"),
    "wise-asft": ("new + old", [], "WiSE-FT (α 0.5) of the ASFT run"),
    "dft": ("new", ["loss.type=dft"], "DFT: each token's CE weighted by its probability"),
    "kl": ("new", ["loss.kl_to_theta0=0.1"], "CE + 0.1·KL(θ0 ‖ θ) at the trained tokens"),
    "asft": ("new", ["loss.type=dft", "loss.kl_to_theta0=0.1"], "ASFT: DFT + 0.1·KL(θ0 ‖ θ) (ASFT's default weight)"),
    "asft-cached": (
        "new",
        ["loss.type=dft", "loss.kl_to_theta0=0.1", "loss.kl_reference=cached"],
        "ASFT from θ0's top 256 kept before step 1: no θ0 copy, no second forward",
    ),
    "replay": ("new", [REPLAY, "data.mix_ratio=0.1"], "self-distilled replay: θ0's own answers, 10 % of each step"),
}
# The order cells run in. The first session's 31 cells (docs/forgetting.md, 2026-12-07) lived only in
# runs/, which a fresh checkout lacks; their per-item signals are now kept in git (bench/results/study/)
# and the plan rebuilds them: the second task first (cheaper, ~8 min a cell), every mitigation × 3
# seeds, then the first task: 3 seeds of the baseline and the rows on or near its front, one seed of
# the rest. BoolQ was the first choice of second task: at lr 3e-4 it learned nothing (task 53.0 → 50.0 %,
# "yes" to almost every question, the training set's 2:1 lean) while forgetting the most of any run,
# and at lr 1e-4 nothing either; docs/forgetting.md keeps that record, and its cells are not rerun.
SECOND = ("baseline", "l2sp", "replay", "wise", "wise-replay", "low-lr", "asft", "dft")
PLAN = [
    *(f"subjects/{r}/{s}" for s in (0, 1, 2) for r in SECOND),
    *(
        f"sst2/{r}/0"
        for r in ("baseline", "asft", "replay", "wise", "dft", "asft-cached", "wise-replay", "wise-asft", "l2sp")
    ),
    *(f"sst2/{r}/0" for r in ("low-lr", "kl")),
    *(f"sst2/{r}/{s}" for s in (1, 2) for r in SECOND),
    "sst2/mix/0",
]


def cell_dir(cell: str) -> Path:
    task, row, seed = cell.split("/")
    return OUT / task / row / f"seed{seed}"


def command(cell: str) -> list[str]:
    task, row, seed = cell.split("/")
    if row.startswith("wise"):
        source = row.removeprefix("wise-") if "-" in row else "baseline"
        base, out = f"runs/study/{task}/{source}/seed{seed}", f"runs/study/{cell_dir(cell).relative_to(OUT)}"
        return ["fulltune", "interpolate", "default", f"{base}/final", "--alphas", "0.5", "--out", str(out)]
    config, *recipe = TASKS[task]
    out = f"runs/study/{cell_dir(cell).relative_to(OUT)}"
    return [
        "fulltune",
        "train",
        config,
        *recipe,
        *COMMON,
        *ROWS[row][1],
        f"train.seed={seed}",
        f"train.output_dir={out}",
    ]


def wise_source(cell: str) -> str | None:
    """The trained cell a WiSE-FT cell blends with θ0 (None: not a WiSE-FT cell)."""
    task, row, seed = cell.split("/")
    if not row.startswith("wise"):
        return None
    return f"{task}/{row.removeprefix('wise-') if '-' in row else 'baseline'}/{seed}"


def kept(cell: str) -> Path:
    """A finished cell's per-item signals, kept in git (study_table.load writes it)."""
    task, row, seed = cell.split("/")
    return KEPT / task / row / f"seed{seed}.json"


def done_here(cell: str) -> bool:
    """The cell's run folder is here, finished."""
    return (cell_dir(cell) / ("interpolate.json" if wise_source(cell) else "results.json")).is_file()


def done(cell: str) -> bool:
    return done_here(cell) or kept(cell).is_file()


def run_cell(cell: str, folder: Path | None = None, cmd: list[str] | None = None) -> bool:
    """Run one cell in its own process (its output in DIR.log); False when it failed. `folder` and
    `cmd`: another bench's cell (bench/lean_factors.py), run the same way."""
    folder, cmd = folder or cell_dir(cell), cmd or command(cell)
    if wise_source(cell) and not done_here(wise_source(cell)):  # the blend needs its source's final/
        print(f"[study] {cell}: waits for {wise_source(cell)}'s run folder", flush=True)
        return False
    print(f"[study] {cell}: $ {shlex.join(cmd)}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "fulltune", *cmd[1:]],
            cwd=ROOT,
            env=bench_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"[study] {cell}: failed (exit {proc.returncode}, {wall:.0f} s); see {folder}.log", flush=True)
        return False
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # final/ is what the study reads
    (folder / "wall_s.txt").write_text(f"{wall:.0f}\n")
    print(f"[study] {cell}: done in {wall:.0f} s", flush=True)
    return True


def run_cells(cells: list[str], *, done, run, budget_min: float | None) -> None:
    """Run each cell not `done` in order (`run`), starting none after `budget_min` minutes."""
    started = time.perf_counter()
    for cell in cells:
        if done(cell):
            continue
        if budget_min is not None and time.perf_counter() - started > 60 * budget_min:
            print(f"[study] out of the {budget_min:g}-minute budget: {cell} and later cells wait", flush=True)
            break
        run(cell)


def main() -> None:
    from study_table import load, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(PLAN), help="comma-separated TASK/ROW/SEED cells, in order")
    ap.add_argument("--budget-min", type=float, default=None, help="start no new cell after this many minutes")
    ap.add_argument("--tables-only", action="store_true", help="run nothing: tables from the finished cells")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    args = ap.parse_args()
    print(f"[study] {cpu_name()}, {' '.join(cpu_flags())}", flush=True)
    if not args.tables_only:  # each finished cell's per-item signals kept in bench/results/study/ at once
        run_cells(args.cells.split(","), done=done, run=lambda c: run_cell(c) and load(c), budget_min=args.budget_min)
    finished = [c for c in PLAN if done(c)]
    write_results(finished, write=not args.no_write)


if __name__ == "__main__":
    main()
