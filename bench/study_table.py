"""The forgetting study's tables, from its finished cells (bench/forgetting_study.py runs them).

Per (task, mitigation), over its seeds, each change θ0 → θ* on the same items, pooled over seeds with
a two-stage bootstrap (seeds, then items: fulltune.evals.paired.seeds_change):
- the task's accuracy gain; each multiple-choice probe's accuracy, and all three pooled (600 items);
- the gold answers' NLL over the three (the continuous signal), each code probe's NLL, both pooled;
- the drift monitor's KL(θ0 ‖ θ*) per token, on general text and on the task's held-out answers.
"vs baseline" is the mitigation's change minus the baseline's on the same task, the same items, its
interval from the same two-stage bootstrap, each side's seeds drawn separately.
A Pareto front by the point estimates: no other row has at least the task gain, at least the MC
change and at most the code-NLL change, and is better on one. The drift monitor's rank correlation
with each forgetting signal over the training runs (Spearman, bootstrap interval over runs).
"""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
from common import cpu_flags, cpu_name
from forgetting_study import ROOT, ROWS, cell_dir, command, done_here, kept, wise_source

from fulltune.evals import records
from fulltune.evals.paired import RESAMPLES, SEED, seeds_change, spearman

MC, CODE = ("arc_easy", "piqa", "sciq"), ("humaneval", "mbpp")
MIN_RUNS = 6  # a bootstrap over fewer runs gives intervals that mean nothing (4 runs: often [+1, +1])
NAMES = {"arc_easy": "ARC-Easy", "piqa": "PIQA", "sciq": "SciQ", "humaneval": "HumanEval NLL", "mbpp": "MBPP NLL"}


def _compact(record: dict) -> dict:
    """The part of a records file the tables read: the task's and each probe's per-item signals."""
    keep = {"correct": 0, "gold_logprob": 4, "nll": 4}  # value -> decimals kept

    def lists(d: dict) -> dict:
        return {k: [round(v, keep[k]) if keep[k] else int(v) for v in d[k]] for k in keep if k in d}

    return {"task": lists(record["task"]), "probes": {n: lists(v) for n, v in record["probes"].items()}}


def load(cell: str) -> dict:
    """One finished cell: θ0's and θ*'s per-item records, the drift KL, times. From the run's folder
    when it is there (and then kept, compact, in bench/results/study/, which git holds), else from
    what was kept: a fresh checkout goes on with the study without rerunning its cells."""
    folder = cell_dir(cell)
    if not done_here(cell):
        return json.loads(kept(cell).read_text())
    out = _load_run(cell, folder)
    out = out | {"before": _compact(out["before"]), "after": _compact(out["after"])}
    kept(cell).parent.mkdir(parents=True, exist_ok=True)
    kept(cell).write_text(json.dumps(out, separators=(",", ":")) + "\n")
    return out


def _load_run(cell: str, folder) -> dict:
    wall = (folder / "wall_s.txt").read_text().strip() if (folder / "wall_s.txt").is_file() else None
    if wise_source(cell):
        base = cell_dir(wise_source(cell))
        rows = json.loads((folder / "interpolate.json").read_text())["rows"]
        after = next(r for r in rows if r["alpha"] == 0.5)["items"]
        return {
            "cell": cell,
            "before": records.read(base, 0),
            "after": after,
            "drift": None,
            "train_s": None,
            "wall_s": wall,
        }
    results = json.loads((folder / "results.json").read_text())
    last = records.steps(folder)[-1]
    return {
        "cell": cell,
        "before": records.read(folder, 0),
        "after": records.read(folder, last),
        "drift": results.get("drift"),
        "train_s": results.get("train_time_s"),
        "wall_s": wall,
    }


def signals(rec: dict) -> dict[str, tuple[str, list[float]]]:
    """A record's per-item signals: name -> (kind, values)."""
    p, out = rec["probes"], {"task": ("points", rec["task"]["correct"])}
    for name in MC:
        out[name] = ("points", p[name]["correct"])
    out["mc"] = ("points", [c for n in MC for c in p[n]["correct"]])
    out["gold_nll"] = ("%", [-lp for n in MC for lp in p[n]["gold_logprob"]])
    for name in CODE:
        out[name] = ("%", p[name]["nll"])
    out["code"] = ("%", [x for n in CODE for x in p[n]["nll"]])
    return out


def pooled(cells: list[dict]) -> dict[str, dict]:
    """Each signal's change over the cells' seeds (θ0 is the same in every cell: checked)."""
    before = signals(cells[0]["before"])
    out = {}
    for name, (kind, b) in before.items():
        afters = []
        for c in cells:
            assert signals(c["before"])[name][1] == b, f"{c['cell']}: θ0's records differ"
            afters.append(signals(c["after"])[name][1])
        out[name] = seeds_change(kind, b, afters)
    return out


def difference(kind: str, before: list[float], a: list[list[float]], b: list[list[float]]) -> dict:
    """(change of runs a) − (change of runs b) on the same items: two-stage bootstrap, each group's
    seeds resampled on its own, the items once for both."""
    x0, xa, xb = (np.asarray(v, dtype=np.float64) for v in (before, a, b))
    rng = np.random.default_rng(SEED + 4)
    items = rng.integers(0, len(x0), size=(RESAMPLES, len(x0)))
    ia = rng.integers(0, len(xa), size=(RESAMPLES, len(xa)))
    ib = rng.integers(0, len(xb), size=(RESAMPLES, len(xb)))

    def stat(ga: np.ndarray, gb: np.ndarray, base: np.ndarray) -> np.ndarray:
        if kind == "points":
            return 100.0 * (ga.mean(axis=(-2, -1)) - gb.mean(axis=(-2, -1)))
        return 100.0 * (ga.sum(axis=-1).mean(axis=-1) - gb.sum(axis=-1).mean(axis=-1)) / base.sum(axis=-1)

    point = float(stat(xa, xb, x0))
    boot = stat(xa[ia[:, :, None], items[:, None, :]], xb[ib[:, :, None], items[:, None, :]], x0[items])
    return {"change": point, "ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])]}


def fmt(c: dict | None, digits: int = 1) -> str:
    if c is None:
        return "–"
    lo, hi = c["ci95"]
    mark = "**" if lo > 0 or hi < 0 else ""
    return f"{mark}{c['change']:+.{digits}f}{mark} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def drift_mean(cells: list[dict], key: str) -> float | None:
    vals = [c["drift"][key] for c in cells if c["drift"] and c["drift"].get(key) is not None]
    return float(np.mean(vals)) if vals else None


def summarise(finished: list[str]) -> dict[str, dict]:
    """{task: {row: {"cells", "changes", "vs_baseline", "kl_general", "kl_task", "train_s"}}}."""
    loaded = [load(c) for c in finished]
    out: dict[str, dict] = {}
    for task in dict.fromkeys(c.split("/")[0] for c in finished):
        rows = {}
        for row in ROWS:
            cells = [x for x in loaded if x["cell"].startswith(f"{task}/{row}/")]
            if cells:
                rows[row] = {"cells": cells, "changes": pooled(cells)}
        for row, r in rows.items():
            r["kl_general"], r["kl_task"] = drift_mean(r["cells"], "kl_general"), drift_mean(r["cells"], "kl_task")
            times = [c["train_s"] for c in r["cells"] if c["train_s"] is not None]
            r["train_s"] = float(np.mean(times)) if times else None
            r["vs_baseline"] = vs_baseline(rows, row)
        out[task] = rows
    return out


def vs_baseline(rows: dict, row: str) -> dict:
    if row == "baseline" or "baseline" not in rows:
        return {}
    base, mine = rows["baseline"]["cells"], rows[row]["cells"]
    out = {}
    for name in ("task", "mc", "gold_nll", "code"):
        kind, b = signals(base[0]["before"])[name]
        out[name] = difference(
            kind, b, [signals(c["after"])[name][1] for c in mine], [signals(c["after"])[name][1] for c in base]
        )
    return out


def front(rows: dict) -> set[str]:
    """Rows no other row dominates on (task gain ↑, MC change ↑, code NLL change ↓), point estimates."""
    pts = {
        r: (v["changes"]["task"]["change"], v["changes"]["mc"]["change"], -v["changes"]["code"]["change"])
        for r, v in rows.items()
    }
    return {
        r for r, p in pts.items()
        if not any(all(q[i] >= p[i] for i in range(3)) and q != p for o, q in pts.items() if o != r)
    }  # fmt: skip


HEAD = (
    "| mitigation | kind | seeds | task gain | MC accuracy (3 probes) | MC gold-answer NLL | code NLL (2 probes) "
    "| KL general | KL task | train s (shared machine) | front |"
)


def _main_row(row: str, r: dict, on_front: bool) -> str:
    ch = r["changes"]
    kl = [f"{r[k]:.3f}" if r[k] is not None else "–" for k in ("kl_general", "kl_task")]
    train = f"{r['train_s']:.0f}" if r["train_s"] is not None else "–"
    cells = [row, ROWS[row][0], str(len(r["cells"])), fmt(ch["task"]), fmt(ch["mc"]), fmt(ch["gold_nll"]) + " %"]
    cells += [fmt(ch["code"]) + " %", kl[0], kl[1], train, "★" if on_front else ""]
    return "| " + " | ".join(cells) + " |"


def task_tables(task: str, rows: dict) -> str:
    on_front = front(rows)
    lines = [HEAD, "| --- | --- | ---: |" + " ---: |" * 7 + " --- |"]
    lines += [_main_row(row, r, row in on_front) for row, r in rows.items()]
    lines += ["", "Against the baseline (the mitigation's change minus the baseline's, same items):", ""]
    lines += [
        "| mitigation | task gain | MC accuracy | MC gold-answer NLL | code NLL |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row, r in rows.items():
        if r["vs_baseline"]:
            v = r["vs_baseline"]
            lines.append(f"| {row} | {fmt(v['task'])} | {fmt(v['mc'])} | {fmt(v['gold_nll'])} % | {fmt(v['code'])} % |")
    lines += ["", "Each probe (accuracy in points, NLL in %):", ""]
    lines += ["| mitigation | " + " | ".join(NAMES[n] for n in (*MC, *CODE)) + " |", "| --- |" + " ---: |" * 5]
    for row, r in rows.items():
        lines.append(f"| {row} | " + " | ".join(fmt(r["changes"][n]) for n in (*MC, *CODE)) + " |")
    return "\n".join(lines)


def correlations(summary: dict) -> tuple[str, dict]:
    """Spearman's ρ of the drift KL at θ* against each run's own change, over every training run."""
    runs = [
        (c, signals(c["before"]), signals(c["after"]))
        for rows in summary.values()
        for r in rows.values()
        for c in r["cells"]
        if c["drift"]
    ]
    out, lines = {}, ["| drift KL | vs | ρ | 95 % interval | runs |", "| --- | --- | ---: | ---: | ---: |"]
    if len(runs) < 4:
        return "(fewer than 4 training runs with the drift monitor: no correlation yet)", out
    for key in ("kl_general", "kl_task"):
        x = [c["drift"][key] for c, _, _ in runs]
        for name in ("mc", "gold_nll", "code"):
            y = [seeds_change(b[name][0], b[name][1], [a[name][1]])["change"] for _, b, a in runs]
            s = spearman(x, y)
            out[f"{key}~{name}"] = s
            ci = f"[{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if s["n"] >= MIN_RUNS else f"– (under {MIN_RUNS} runs)"
            lines.append(f"| {key} | {name} | {s['rho']:+.2f} | {ci} | {s['n']} |")
    return "\n".join(lines), out


def hot_baseline_check(summary: dict) -> str:
    """The issue's calibration: each hot baseline run's code-NLL rise is reported as lost, its interval
    excluding 0 (per run: what that run's own forgetting table says)."""
    lines = []
    for rows in summary.values():
        for c in rows.get("baseline", {}).get("cells", []):
            b, a = signals(c["before"]), signals(c["after"])
            for name in CODE:
                ch = seeds_change("%", b[name][1], [a[name][1]])
                ok = ch["verdict"] == "lost" and ch["ci95"][0] > 0
                lines.append(f"- {c['cell']} {NAMES[name]}: {fmt(ch)} %, {ch['verdict']}: {'holds' if ok else 'FAILS'}")
    return "Calibration, the hot baseline's code-NLL rise reported as lost:\n\n" + (
        "\n".join(lines) or "- no baseline yet"
    )


def _numbers(d: dict) -> dict:
    """A row's numbers for the JSON: everything but the loaded records, with its cells and wall times."""
    out = {k: v for k, v in d.items() if k != "cells"}
    return out | {"seeds": [c["cell"] for c in d["cells"]], "wall_s": [c["wall_s"] for c in d["cells"]]}


def write_results(finished: list[str], write: bool = True) -> None:
    summary = summarise(finished)
    blocks = [f"Measured on {cpu_name()} ({' '.join(cpu_flags())}), 2 cores; cells finished: {len(finished)}."]
    for task, rows in summary.items():
        first = next(iter(rows.values()))["cells"][0]["before"]["task"]["correct"]
        blocks += [f"**{task}** (θ0 task accuracy {100 * np.mean(first):.1f}%)", task_tables(task, rows)]
    calibration = hot_baseline_check(summary)
    blocks.append(calibration)
    corr_text, corr = correlations(summary)
    blocks += ["The drift monitor against the probes, over the training runs (Spearman):", corr_text]
    blocks += [
        "Commands (from the repository root), one per cell:",
        "```\n" + "\n".join(f"# {c}\n{shlex.join(command(c))}" for c in finished) + "\n```",
    ]
    text = "\n\n".join(blocks)
    print(text)
    tasks = {t: {r: _numbers(d) for r, d in rows.items()} for t, rows in summary.items()}
    data = {"cpu": cpu_name(), "flags": cpu_flags(), "cells": finished, "tasks": tasks}
    data.update(correlations=corr, calibration=calibration)
    if write:
        (ROOT / "bench" / "results" / "forgetting_study.json").write_text(json.dumps(data, indent=1) + "\n")
        doc = ROOT / "docs" / "forgetting.md"
        new = f"<!-- BENCH:forgetting_study -->\n{text}\n<!-- /BENCH:forgetting_study -->"
        body = re.sub(
            r"<!-- BENCH:forgetting_study -->.*?<!-- /BENCH:forgetting_study -->",
            lambda _: new,
            doc.read_text(),
            flags=re.S,
        )
        doc.write_text(body)
