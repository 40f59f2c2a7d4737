"""`fulltune compare RUN_A RUN_B ...`: finished runs side by side — final task accuracy, validation
loss, each probe's change, ‖θ* − θ0‖, memory and time — as a markdown table on stdout and one
offline HTML page (OUT, default compare.html) with the task-gain vs forgetting Pareto plot.
A `fulltune interpolate` output directory adds one row per WiSE-FT α."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import yaml

from fulltune.errors import UserError
from fulltune.evals.forgetting import forgetting_report, gain
from fulltune.report import read_run


def register(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="finished runs side by side: a markdown table and an HTML page with the "
        "task-gain vs forgetting Pareto plot",
    )
    c.add_argument(
        "runs",
        nargs="+",
        help="run directories (train.output_dir), or `fulltune interpolate` output directories (one row per α)",
    )
    c.add_argument("--out", default="compare.html", help="HTML page to write (default compare.html)")
    c.set_defaults(run=run)


def distance_to_theta0(final_dir: Path, model_path: str) -> float | None:
    """‖θ* − θ0‖₂ over every tensor both hold, streamed tensor by tensor from the safetensors files."""
    from safetensors import safe_open

    from fulltune.model import resolve_model_path

    try:
        theta0 = resolve_model_path(model_path)
    except UserError:
        return None
    final, base = sorted(final_dir.glob("*.safetensors")), sorted(theta0.glob("*.safetensors"))
    if not final or not base:
        return None
    where = {}
    for f in base:
        with safe_open(str(f), "pt") as fh:
            where.update(dict.fromkeys(fh.keys(), f))
    total = 0.0
    for f in final:
        with safe_open(str(f), "pt") as fh:
            names = fh.keys()  # a safetensors handle is not iterable itself
            for key in names:
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
    return _row(
        str(run_dir),
        r.get("task_accuracy_final"),
        r.get("task_accuracy_theta0"),
        r.get("forgetting") or {},
        val_loss=r.get("final_val_loss"),
        distance=distance_to_theta0(run_dir / "final", str((cfg.get("model") or {}).get("path", "default"))),
        peak_gb=(r.get("memory") or {}).get("measured_peak_gb"),
        time_s=r.get("train_time_s"),
    )


def _row(name: str, task: dict | None, task0: dict | None, report: dict, **rest) -> dict:
    """A table row: task accuracy and gain in points; each probe's change from its forgetting-report
    row (up = better: accuracy points, or −% NLL) with its unit and paired 95 % interval (None for
    runs from before per-item records); the worst probe's loss."""
    forgetting = report.get("probes") or {}
    gains = {probe: gain(p) for probe, p in forgetting.items()}
    probes = {probe: g for probe, (g, _) in gains.items()}
    task_row = report.get("task")
    return {
        "run": name,
        "task": 100 * task["accuracy"] if task else None,
        "task_gain": 100 * (task["accuracy"] - task0["accuracy"]) if task and task0 else None,
        "task_ci": gain({"metric": "acc", **task_row})[1] if task_row and "unit" in task_row else None,
        "probes": probes,
        "intervals": {probe: ci for probe, (_, ci) in gains.items()},
        "units": {probe: "points" if p["metric"] == "acc" else "−% NLL" for probe, p in forgetting.items()},
        "forgetting": -min(probes.values()) if probes else None,
        **rest,
    }


def interpolation_rows(out_dir: Path) -> list[dict]:
    """One row per α of `fulltune interpolate --out OUT_DIR`, each probe's change measured from θ0's scores:
    its α = 0 row, else those of the run whose final/ was blended."""
    path = out_dir / "interpolate.json"
    try:
        data = json.loads(path.read_text())
        theta0, finetuned = str(data["theta0"]), Path(data["finetuned"]).expanduser()
        rows = [dict(r, alpha=float(r["alpha"])) for r in data["rows"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not written by fulltune interpolate ({type(exc).__name__}: {exc})") from None
    run_results = finetuned.parent / "results.json"
    zero = next((r for r in rows if r["alpha"] == 0), None)
    if zero is not None:
        task0, probes0 = zero.get("task"), zero.get("probes")
    elif finetuned.name == "final" and run_results.is_file():
        try:
            r = json.loads(run_results.read_text())
            task0, probes0 = r.get("task_accuracy_theta0"), r.get("probes_theta0")
        except (ValueError, AttributeError) as exc:
            raise UserError(f"{run_results}: not a run's results.json ({type(exc).__name__}: {exc})") from None
    else:
        raise UserError(
            f"{path}: no α = 0 row, and {finetuned} is not a run's final/ with "
            "θ0's scores; rerun interpolate with 0 among --alphas"
        )
    full = distance_to_theta0(finetuned, theta0)
    out = []
    for r in rows:
        out.append(
            _row(
                f"{out_dir} α={r['alpha']:g}",
                r.get("task"),
                task0,
                _paired_with_zero(zero, r, probes0),
                val_loss=None,
                distance=r["alpha"] * full if full is not None else None,  # θ(α) − θ0 = α(θ* − θ0)
                peak_gb=None,
                time_s=None,
            )
        )  # no training: blending and scoring only
    return out


def _paired_with_zero(zero: dict | None, row: dict, probes0: dict | None) -> dict:
    """The row's forgetting report against the α = 0 row, paired on their per-item records when both
    have them (interpolate.json from 2026-12-07 on)."""
    items0, items = (zero or {}).get("items") or {}, row.get("items") or {}
    task = None
    if zero and zero.get("task") and row.get("task"):
        task = {
            "before": {**zero["task"], "items": items0.get("task")},
            "after": {**row["task"], "items": items.get("task")},
        }
    return forgetting_report(
        probes0 or {}, row.get("probes") or {}, (items0.get("probes") or {}, items.get("probes") or {}), task
    )


def rows_of(path: Path) -> list[dict]:
    """A run directory's row, or an interpolation directory's rows."""
    return interpolation_rows(path) if (path / "interpolate.json").is_file() else [run_row(path)]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _with_ci(value, ci) -> str:
    """ "+1.0 [−2.0, +4.0]": a change with its paired 95 % interval (just the change when unpaired)."""
    return _fmt(value, "+.1f") + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if value is not None and ci else "")


def cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and one row of text cells per run."""
    units = {p: u for r in rows for p, u in r["units"].items()}
    probes = sorted(units)
    head = (
        ["run", "task acc %", "task gain [95 % CI]", "val loss"]
        + [f"Δ {p} ({units[p]}) [95 % CI]" for p in probes]
        + ["‖θ−θ0‖", "peak GB", "time s"]
    )
    body = [
        [r["run"], _fmt(r["task"], ".1f"), _with_ci(r["task_gain"], r.get("task_ci")), _fmt(r["val_loss"], ".4f")]
        + [_with_ci(r["probes"].get(p), r.get("intervals", {}).get(p)) for p in probes]
        + [_fmt(r["distance"], ".3g"), _fmt(r["peak_gb"], ".2f"), _fmt(r["time_s"], ".0f")]
        for r in rows
    ]
    return head, body


def markdown(rows: list[dict]) -> str:
    head, body = cells(rows)
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(row) + " |" for row in body]
    )


def pareto(rows: list[dict]) -> list[str]:
    """Runs no other run beats on both task gain (higher) and forgetting (lower)."""
    ok = [r for r in rows if r["task_gain"] is not None and r["forgetting"] is not None]
    return [
        r["run"]
        for r in ok
        if not any(
            o["task_gain"] >= r["task_gain"]
            and o["forgetting"] <= r["forgetting"]
            and (o["task_gain"], o["forgetting"]) != (r["task_gain"], r["forgetting"])
            for o in ok
        )
    ]


def page(rows: list[dict]) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    front = set(pareto(rows))
    ok = [r for r in rows if r["task_gain"] is not None and r["forgetting"] is not None]
    colours = ["#d62728" if r["run"] in front else "#1f77b4" for r in ok]
    fig = go.Figure(
        go.Scatter(
            x=[r["forgetting"] for r in ok],
            y=[r["task_gain"] for r in ok],
            mode="markers+text",
            text=[Path(r["run"]).name + (" ★" if r["run"] in front else "") for r in ok],
            textposition=[("top", "bottom")[i % 2] + " center" for i in range(len(ok))],  # near points
            marker=dict(size=12, color=colours),
        )
    )
    fig.update_layout(
        title="Task gain vs forgetting (★: on the Pareto front)",
        xaxis_title="forgetting: the worst probe's loss (accuracy points or % NLL)",
        yaxis_title="task gain (accuracy points)",
    )
    head, body = cells(rows)
    table = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        + "</table>"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fulltune compare</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px}</style></head><body><h1>fulltune compare</h1>"
        + table
        + pio.to_html(fig, include_plotlyjs=True, full_html=False, div_id="pareto")
        + "</body></html>"
    )


def run(args) -> None:
    rows = [row for r in args.runs for row in rows_of(Path(r).expanduser())]
    print(markdown(rows))
    out = Path(args.out).expanduser()
    out.write_text(page(rows), encoding="utf-8")
    front = pareto(rows)
    print(
        f"\n[compare] Pareto front (task gain vs forgetting): {', '.join(front) if front else 'no run has both'}; "
        f"page: {out}"
    )
