"""Quickstart recipes side by side: task accuracy, validation loss and time, over seeds.

Each (recipe, seed) runs `fulltune train configs/quickstart.yaml` in its own process with the
recipe's overrides and `train.seed`, and reads back results.json: θ* task accuracy on the 200
held-out reviews (±2.5 points s.e. at 85%: one run says little, hence seeds), the final
validation loss, training time and wall time. Probes are off unless `--probes` (they do not
change the training, only the time).

`--avx2` caps this CPU's instruction set at AVX2 for the runs (ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2): the software bf16 path and AVX2 fp32
kernels of a CPU without AVX512/AMX, where `precision: auto` picks fp32.

    .venv/bin/python bench/quickstart_recipes.py [--seeds 0 1 2] [--only LABEL ...] [--avx2] [--probes]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, bench_env, cpu_flags, cpu_name

LONG = ["data.train=builtin:sst2/train", "eval.task_file=builtin:sst2/test"]  # the instruction prompt
RECIPES = {  # label: overrides on configs/quickstart.yaml (short prompt, 2 packed rows a step, lr 1e-4, 1 epoch)
    "quickstart": [],
    "lr 3e-5": ["optim.lr=3e-5"],
    "lr 5e-5": ["optim.lr=5e-5"],
    "lr 2e-4": ["optim.lr=2e-4"],
    "1 row": ["train.micro_batch_size=1"],
    "1 row, lr 5e-5": ["train.micro_batch_size=1", "optim.lr=5e-5"],
    "3 rows, lr 5e-5": ["train.micro_batch_size=3", "optim.lr=5e-5"],
    "4 rows, lr 5e-5": ["train.micro_batch_size=4", "optim.lr=5e-5"],
    "4 rows, lr 5e-5, 2 epochs": ["train.micro_batch_size=4", "optim.lr=5e-5", "train.epochs=2"],
    "instruction prompt, 4 rows, lr 5e-5": [*LONG, "train.micro_batch_size=4", "optim.lr=5e-5"],  # before 2026-12-03
    "instruction prompt, 4 rows, lr 5e-5, 2 epochs": [
        *LONG,
        "train.micro_batch_size=4",
        "optim.lr=5e-5",
        "train.epochs=2",
    ],
}


def run_one(label: str, overrides: list[str], seed: int, folder: Path, env: dict, probes: bool) -> dict:
    out = folder / f"{label.replace(' ', '_').replace(',', '')}-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "fulltune",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"train.output_dir={out}",
        f"train.seed={seed}",
        "train.progress=false",
        "train.save_interval=0",
        *([] if probes else ["eval.probes=[]"]),
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} seed {seed}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    precision = next(
        (
            line.split("precision ")[1].split(",")[0]
            for line in proc.stdout.splitlines()
            if line.startswith("[train] device")
        ),
        "?",
    )
    return {
        "label": label,
        "overrides": overrides,
        "seed": seed,
        "precision": precision,
        "accuracy": res["task_accuracy_final"]["accuracy"],
        "accuracy_theta0": res["task_accuracy_theta0"]["accuracy"],
        "val_loss": res.get("final_val_loss"),
        "steps": res["steps"],
        "train_s": res["train_time_s"],
        "wall_s": wall,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | precision | seeds | accuracy per seed | mean | val loss (mean) | steps | train s | wall s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        accs = [100 * r["accuracy"] for r in rs]
        lines.append(
            f"| {label} | {rs[0]['precision']} | {', '.join(str(r['seed']) for r in rs)} | "
            f"{' / '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(accs):.1f} | "
            f"{statistics.mean(r['val_loss'] for r in rs):.3f} | {rs[0]['steps']} | "
            f"{statistics.mean(r['train_s'] for r in rs):.0f} | {statistics.mean(r['wall_s'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="recipe labels (default: all)")
    ap.add_argument("--avx2", action="store_true", help="cap the instruction set at AVX2 (no bf16 units)")
    ap.add_argument("--probes", action="store_true", help="keep the quickstart's probes (time only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quickstart_recipes.json"))
    args = ap.parse_args()
    env = bench_env(args.avx2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in RECIPES.items():
            if args.only and label not in args.only:
                continue
            for seed in args.seeds:
                rows.append(run_one(label, overrides, seed, Path(tmp), env, args.probes))
                r = rows[-1]
                print(
                    f"{label} seed {seed} ({r['precision']}): {100 * r['accuracy']:.1f}%, "
                    f"val loss {r['val_loss']:.4f}, train {r['train_s']:.0f} s, wall {r['wall_s']:.0f} s",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "avx2_cap": args.avx2, "probes": args.probes, "rows": rows},
            indent=1,
        )
    )
    print(
        f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}{' (capped at AVX2)' if args.avx2 else ''}\n\n{table(rows)}"
    )


if __name__ == "__main__":
    main()
