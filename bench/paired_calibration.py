"""Do the paired intervals cover what they claim? And how many answers flip in a real run?

Two record files scored on the same items (RUN/records/step_N.json, evals/records.py): two runs'
θ* that differ only in seed, or one run's θ0 (step 0) and θ*. For every probe, the change over all
of the file's items is the truth for a subset drawn from them; over `--subsets` random subsets of
`--n` items, count how often the paired 95 % interval covers it (the issue's goal: ≥ 90 %). Also
prints what the `[detect]` line assumes (evals/theta0.py): the share of multiple-choice answers that
flipped, relative to 2p(1−p), and the spread of code / text items' paired NLL changes relative to
θ0's mean item.

    .venv/bin/python bench/paired_calibration.py A.json B.json [--n 50] [--subsets 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fulltune.evals.forgetting import paired  # noqa: E402


def subset(items: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in items.items()}


def truth(kind: str, a: dict, b: dict) -> float:
    return paired(kind, a, b).get("change")


def flips(a: dict, b: dict) -> dict:
    """The observed flip rate, the rate if answers were independent (2p(1−p)), and their ratio."""
    n = len(a["correct"])
    flipped = sum(x != y for x, y in zip(a["correct"], b["correct"])) / n
    p = sum(a["correct"]) / n
    independent = 2 * p * (1 - p)
    return {"flip_rate": flipped, "independent": independent, "share": flipped / independent if independent else None}


def spread(a: dict, b: dict) -> float:
    """sd of the items' paired NLL changes over θ0's mean item NLL (evals/paired.detectable_percent)."""
    d = [y - x for x, y in zip(a["nll"], b["nll"])]
    return statistics.stdev(d) / statistics.fmean(a["nll"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=200)
    args = ap.parse_args()
    first, second = (json.loads(Path(p).read_text())["probes"] for p in (args.a, args.b))
    rng = random.Random(0)
    out = {}
    for name in first:
        a, b = first[name], second[name]
        kind = "mc" if "correct" in a else "text"
        total = len(next(iter(a.values())))
        n = min(args.n, total)
        target = truth(kind, a, b)
        covered = 0
        for _ in range(args.subsets):
            idx = rng.sample(range(total), n)
            lo, hi = paired(kind, subset(a, idx), subset(b, idx))["ci95"]
            covered += lo <= target <= hi
        row = {"items": total, "n": n, "change_all_items": target, "coverage": covered / args.subsets}
        row.update(flips(a, b) if kind == "mc" else {"nll_spread": spread(a, b)})
        out[name] = row
        print(name, json.dumps(row), flush=True)
    Path("bench/results").mkdir(exist_ok=True)
    Path("bench/results/paired_calibration.json").write_text(json.dumps({"a": args.a, "b": args.b, **out}, indent=1))


if __name__ == "__main__":
    main()
