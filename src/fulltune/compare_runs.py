"""`fulltune compare RUN_A RUN_B ...`: finished runs side by side — final task accuracy, validation
loss, each probe's change, ‖θ* − θ0‖, memory and time — as a markdown table on stdout and one
offline HTML page (OUT, default compare.html) with the task-gain vs forgetting Pareto plot."""

from __future__ import annotations

import html
import math
from pathlib import Path

import yaml

from fulltune.errors import UserError
from fulltune.evals.forgetting import gain
from fulltune.report import read_run


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="finished runs side by side: a markdown table and an HTML page with the "
                                       "task-gain vs forgetting Pareto plot")
    c.add_argument("runs", nargs="+", help="run directories (train.output_dir)")
    c.add_argument("--out", default="compare.html", help="HTML page to write (default compare.html)")


def distance_to_theta0(run_dir: Path, model_path: str) -> float | None:
    """‖θ* − θ0‖₂ over every tensor both hold, streamed tensor by tensor from the safetensors files."""
    from safetensors import safe_open

    from fulltune.model import resolve_model_path
    try:
        theta0 = resolve_model_path(model_path)
    except UserError:
        return None
    final, base = sorted((run_dir / "final").glob("*.safetensors")), sorted(theta0.glob("*.safetensors"))
    if not final or not base:
        return None
    where = {}
    for f in base:
        with safe_open(str(f), "pt") as fh:
            where.update({k: f for k in fh.keys()})
    total = 0.0
    for f in final:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                if key in where:
                    with safe_open(str(where[key]), "pt") as b:
                        total += float((fh.get_tensor(key).double() - b.get_tensor(key).double()).pow(2).sum())
    return math.sqrt(total)


def run_row(run_dir: Path) -> dict:
    run = read_run(run_dir)
    r = run["results"]
    if r is None:
        raise UserError(f"{run_dir}: not finished (no results.json); compare takes finished runs")
    cfg = yaml.safe_load(run["config"]) or {}
    t0, t1 = r.get("task_accuracy_theta0"), r.get("task_accuracy_final")
    probes = {name: gain(p)[0] for name, p in ((r.get("forgetting") or {}).get("probes") or {}).items()}  # up = better
    return {"run": str(run_dir), "task": 100 * t1["accuracy"] if t1 else None,
            "task_gain": 100 * (t1["accuracy"] - t0["accuracy"]) if t0 and t1 else None,
            "val_loss": r.get("final_val_loss"), "probes": probes,
            "forgetting": -min(probes.values()) if probes else None,  # the worst probe's loss, up is worse
            "distance": distance_to_theta0(run_dir, str((cfg.get("model") or {}).get("path", "default"))),
            "peak_gb": (r.get("memory") or {}).get("measured_peak_gb"), "time_s": r.get("train_time_s")}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and one row of text cells per run."""
    probes = sorted({p for r in rows for p in r["probes"]})
    head = ["run", "task acc %", "task gain", "val loss"] + [f"Δ {p}" for p in probes] + ["‖θ−θ0‖", "peak GB", "time s"]
    body = [[r["run"], _fmt(r["task"], ".1f"), _fmt(r["task_gain"], "+.1f"), _fmt(r["val_loss"], ".4f")]
            + [_fmt(r["probes"].get(p), "+.1f") for p in probes]
            + [_fmt(r["distance"], ".3g"), _fmt(r["peak_gb"], ".2f"), _fmt(r["time_s"], ".0f")] for r in rows]
    return head, body


def markdown(rows: list[dict]) -> str:
    head, body = cells(rows)
    return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in body])


def pareto(rows: list[dict]) -> list[str]:
    """Runs no other run beats on both task gain (higher) and forgetting (lower)."""
    ok = [r for r in rows if r["task_gain"] is not None and r["forgetting"] is not None]
    return [r["run"] for r in ok if not any(o["task_gain"] >= r["task_gain"] and o["forgetting"] <= r["forgetting"]
                                            and (o["task_gain"], o["forgetting"]) != (r["task_gain"], r["forgetting"])
                                            for o in ok)]


def page(rows: list[dict]) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio
    front = set(pareto(rows))
    ok = [r for r in rows if r["task_gain"] is not None and r["forgetting"] is not None]
    fig = go.Figure(go.Scatter(x=[r["forgetting"] for r in ok], y=[r["task_gain"] for r in ok], mode="markers+text",
                               text=[Path(r["run"]).name + (" ★" if r["run"] in front else "") for r in ok],
                               textposition="top center", marker=dict(size=12, color=["#d62728" if r["run"] in front
                                                                                        else "#1f77b4" for r in ok])))
    fig.update_layout(title="Task gain vs forgetting (★: on the Pareto front)",
                      xaxis_title="forgetting: the worst probe's loss (accuracy points or % NLL)",
                      yaxis_title="task gain (accuracy points)")
    head, body = cells(rows)
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fulltune compare</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:4px 8px}</style></head><body><h1>fulltune compare</h1>" + table
            + pio.to_html(fig, include_plotlyjs=True, full_html=False, div_id="pareto") + "</body></html>")


def run_compare_command(args) -> None:
    rows = [run_row(Path(r).expanduser()) for r in args.runs]
    print(markdown(rows))
    out = Path(args.out).expanduser()
    out.write_text(page(rows), encoding="utf-8")
    front = pareto(rows)
    print(f"\n[compare] Pareto front (task gain vs forgetting): {', '.join(front) if front else 'no run has both'}; "
          f"page: {out}")
