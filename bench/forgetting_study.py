"""The forgetting study: SmolLM2-135M on the quickstart task, a baseline that forgets, and each mitigation.

Every row is one `fulltune train configs/quickstart-2026-11.yaml BASE + ROW` run in its own process (its
command is printed and written into the table), scored on the same probe items (100 per
multiple-choice probe, 40 code solutions). WiSE-FT blends θ0 with the baseline's final weights
at α = 0.25, 0.5, 0.75 (its PNG is copied to docs/forgetting_wise.png).
Runs that already finished (results.json present) are read, not rerun. Writes the table to
docs/forgetting.md between the BENCH markers.

    .venv/bin/python bench/forgetting_study.py [--rows baseline,low-lr,...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "study"
BASE = [
    "optim.lr=3e-4",
    "train.epochs=3",
    "eval.probe_items=100",
    "eval.probe_code_items=40",
    "train.progress=false",
    "train.overwrite=true",
]
GENERAL = "data.general=[builtin:lambada]"
ROWS = {
    "baseline": [],
    "low-lr": ["optim.lr=5e-5"],
    "mix-10%": [GENERAL, "data.mix_ratio=0.1"],
    "l2sp-0.01": ["anchor.method=l2sp", "anchor.lam=0.01"],
    "l2sp-0.1": ["anchor.method=l2sp", "anchor.lam=0.1"],
    "ewc-0.1": [GENERAL, "anchor.method=ewc", "anchor.lam=0.1"],
    "ewc-1": [GENERAL, "anchor.method=ewc", "anchor.lam=1"],
}
WISE_ALPHAS = "0.25,0.5,0.75"  # α = 0 and 1 are θ0 and the baseline
MC, CODE = ("arc_easy", "piqa", "sciq"), ("humaneval", "mbpp")


def command(name: str) -> list[str]:
    return [
        "fulltune",
        "train",
        "configs/quickstart-2026-11.yaml",
        *BASE,
        *ROWS[name],
        f"train.output_dir=runs/study/{name}",
    ]


def distance_from_theta0(final: Path) -> float:
    """‖θ − θ0‖₂ over every parameter, from the saved weights."""
    from fulltune.commands.compare import distance_to_theta0

    return distance_to_theta0(final, "default")


def run_row(name: str) -> dict:
    results = OUT / name / "results.json"
    if not results.is_file():
        cmd = command(name)
        print("$ " + shlex.join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fulltune", *cmd[1:]], cwd=ROOT, check=True)
        (OUT / name / "wall_s.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    r = json.loads(results.read_text())
    wall = (OUT / name / "wall_s.txt").read_text().strip() if (OUT / name / "wall_s.txt").is_file() else "?"
    return {
        "name": name,
        "task": r["task_accuracy_final"]["accuracy"],
        "task0": r["task_accuracy_theta0"]["accuracy"],
        "probes": r["probes_final"],
        "probes0": r["probes_theta0"],
        "train_s": r["train_time_s"],
        "wall_s": wall,
        "distance": distance_from_theta0(OUT / name / "final"),
        "cmd": shlex.join(command(name)),
    }


def run_wise(base: str = "baseline") -> list[dict]:
    out = OUT / f"wise-{base}"
    cmd = [
        "fulltune",
        "interpolate",
        "default",
        f"runs/study/{base}/final",
        "--alphas",
        WISE_ALPHAS,
        "--out",
        f"runs/study/wise-{base}",
    ]
    if not (out / "interpolate.json").is_file():
        print("$ " + shlex.join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fulltune", *cmd[1:]], cwd=ROOT, check=True)
        (out / "wall_s.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    shutil.copy(out / "interpolate.png", ROOT / "docs" / "forgetting_wise.png")
    rows = json.loads((out / "interpolate.json").read_text())["rows"]
    wall = (out / "wall_s.txt").read_text().strip()
    full = distance_from_theta0(OUT / base / "final")
    return [
        {
            "name": f"WiSE-FT α={r['alpha']:g} ({base})",
            "task": r["task"]["accuracy"],
            "probes": r["probes"],
            "distance": r["alpha"] * full,
            "train_s": None,
            "wall_s": f"{wall} for {len(rows)} α" if i == 0 else "″",
            "cmd": shlex.join(cmd) if i == 0 else "",
        }
        for i, r in enumerate(rows)
    ]


def table(rows: list[dict], theta0: dict) -> str:
    head = (
        "| run | task acc | ARC-Easy | PIQA | SciQ | mean MC Δ | HumanEval NLL | MBPP NLL | ‖θ−θ0‖ | train s | wall s |"
    )
    lines = [head, "| --- |" + " ---: |" * 10]
    t0 = theta0
    lines.append(
        f"| θ0 | {100 * t0['task']:.1f}% | "
        + " | ".join(f"{100 * t0['probes'][p]['acc']:.0f}%" for p in MC)
        + " | – | "
        + " | ".join(f"{t0['probes'][p]['nll_per_token']:.3f}" for p in CODE)
        + " | 0 | – | – |"
    )
    for r in rows:
        mc_delta = sum(r["probes"][p]["acc"] - t0["probes"][p]["acc"] for p in MC) / len(MC)
        train = f"{r['train_s']:.0f}" if r["train_s"] is not None else "–"
        lines.append(
            f"| {r['name']} | {100 * r['task']:.1f}% | "
            + " | ".join(f"{100 * r['probes'][p]['acc']:.0f}%" for p in MC)
            + f" | {100 * mc_delta:+.1f} | "
            + " | ".join(f"{r['probes'][p]['nll_per_token']:.3f}" for p in CODE)
            + f" | {r['distance']:.1f} | {train} | {r['wall_s']} |"
        )
    return "\n".join(lines)


def commands(rows: list[dict]) -> str:
    return "\n".join(f"# {r['name']}\n{r['cmd']}" for r in rows if r["cmd"])


def write_docs(text: str) -> None:
    doc = ROOT / "docs" / "forgetting.md"
    body = doc.read_text()
    new = f"<!-- BENCH:forgetting_study -->\n{text}\n<!-- /BENCH:forgetting_study -->"
    body = re.sub(
        r"<!-- BENCH:forgetting_study -->.*?<!-- /BENCH:forgetting_study -->", lambda _: new, body, flags=re.S
    )
    doc.write_text(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run or read")
    ap.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT row")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows = [run_row(name) for name in args.rows.split(",")]
    if not args.no_wise and (OUT / "baseline" / "final").is_dir():
        rows += run_wise()
    first = rows[0]
    theta0 = {"task": first["task0"], "probes": first["probes0"]}
    text = table(rows, theta0) + "\n\nCommands (from the repository root):\n```\n" + commands(rows) + "\n```"
    print(text)
    if not args.no_write:
        write_docs(text)


if __name__ == "__main__":
    main()
