"""RUN/report.html, written at the end of `fulltune train` and by `fulltune report RUN_DIR`:, one self-contained
page that opens offline — plotly's JavaScript inlined once, every chart interactive. It shows the
losses, the learning rate per parameter group, the gradient norm, throughput and MFU; memory
predicted against measured, stacked by term; each probe's paired change from θ0 during and after
training, with 95 % intervals, next to the task gain; the data statistics and the resolved config. A run
still in progress or interrupted (no results.json yet) gets a partial report, marked as such."""

from __future__ import annotations

import html
import json
from pathlib import Path

from fulltune import metrics
from fulltune.errors import UserError
from fulltune.evals import records
from fulltune.evals.forgetting import describe_change, gain, record_changes


def read_run(run_dir: Path) -> dict:
    """config.yaml, metrics.jsonl (metrics.read: a torn last line is skipped) and results.json when present."""
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a fulltune run directory (no config.yaml)")
    results = run_dir / "results.json"
    return {
        "dir": run_dir,
        "config": (run_dir / "config.yaml").read_text(encoding="utf-8"),
        "metrics": metrics.read(run_dir),
        "results": json.loads(results.read_text()) if results.is_file() else None,
    }


def _series(metrics: list[dict], key: str) -> tuple[list, list]:
    rows = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and m.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def training_figures(run: dict) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    m = run["metrics"]
    losses, vals, norms, toks, mfu = (_series(m, k) for k in ("loss", "val_loss", "grad_norm", "tokens_per_s", "mfu"))
    loss = go.Figure(
        [
            go.Scatter(x=losses[0], y=losses[1], name="train loss", mode="lines"),
            go.Scatter(x=vals[0], y=vals[1], name="validation loss", mode="lines+markers"),
        ]
    )
    loss.update_layout(title="Loss (mean over target tokens)", xaxis_title="step", yaxis_title="loss")
    rates = [r for r in m if isinstance(r.get("lr"), dict)]
    groups = list(dict.fromkeys(g for r in rates for g in r["lr"]))  # in the order they first appear
    lr = go.Figure(
        [
            go.Scatter(
                x=[r["step"] for r in rates if g in r["lr"]],
                y=[r["lr"][g] for r in rates if g in r["lr"]],
                name=g,
                mode="lines",
            )
            for g in groups
        ]
    )
    lr.update_layout(title="Learning rate per parameter group", xaxis_title="step", yaxis_title="lr")
    norm = go.Figure(go.Scatter(x=norms[0], y=norms[1], name="grad norm", mode="lines"))
    norm.update_layout(title="Gradient norm (before clipping)", xaxis_title="step", yaxis_title="‖g‖")
    speed = make_subplots(specs=[[{"secondary_y": True}]])
    speed.add_trace(go.Scatter(x=toks[0], y=toks[1], name="tokens/s", mode="lines"), secondary_y=False)
    if mfu[0]:
        speed.add_trace(go.Scatter(x=mfu[0], y=[100 * v for v in mfu[1]], name="MFU %", mode="lines"), secondary_y=True)
    speed.update_layout(title="Throughput (non-padding tokens/s) and MFU", xaxis_title="step")
    return [loss, lr, norm, speed]


def memory_figure(results: dict | None):
    """Predicted terms stacked against the measured peak (model state measured, the rest beside it)."""
    import plotly.graph_objects as go

    mem = (results or {}).get("memory") or {}
    terms = mem.get("predicted_terms_gb") or {}
    if not terms:
        return None
    bars = [go.Bar(name=f"predicted: {name}", x=["predicted"], y=[gb]) for name, gb in terms.items()]
    state = ((results.get("state_memory") or {}).get("measured_per_rank_gb") or [{}])[0]
    measured = mem.get("measured_peak_gb") or 0.0
    bars += [go.Bar(name=f"measured: {name}", x=["measured"], y=[gb]) for name, gb in state.items()]
    bars.append(
        go.Bar(
            name="measured: the rest (activations, logits, temporaries)",
            x=["measured"],
            y=[max(0.0, measured - sum(state.values()))],
        )
    )
    fig = go.Figure(bars)
    fig.update_layout(
        barmode="stack",
        yaxis_title="GB",
        title=f"Memory peak for the largest micro-batch: predicted "
        f"{mem.get('predicted_peak_gb', 0):.3g} GB, measured {measured:.3g} GB "
        f"({mem.get('error_pct', 0):+.1f}%) on {mem.get('device', '?')}",
    )
    return fig


def forgetting_figures(run: dict) -> list:
    """Each probe's paired change from θ0 at every scored step, and at θ* beside the task gain, with
    95 % intervals (RUN/records/; a run without them shows the probes' scores over the steps)."""
    import plotly.graph_objects as go

    results = run["results"] or {}
    out = [f for f in [_drift_over_steps(run), _changes_over_steps(run) or _scores_over_steps(run)] if f]
    report = results.get("forgetting") or {}
    rows = {name + ("" if p["metric"] == "acc" else " (−ΔNLL)"): p for name, p in (report.get("probes") or {}).items()}
    if report.get("task"):
        rows = {"task accuracy": {"metric": "acc", **report["task"]}, **rows}
    if rows:
        gains = [gain(p) for p in rows.values()]
        change = [g for g, _ in gains]
        plus = [ci[1] - g if ci else 0 for g, ci in gains]
        minus = [g - ci[0] if ci else 0 for g, ci in gains]
        fig = go.Figure(
            go.Bar(x=list(rows), y=change, error_y=dict(type="data", array=plus, arrayminus=minus), name="change")
        )
        fig.update_layout(
            title="Change from θ0 to θ*: task gain and each probe (points for accuracy, % for NLL; paired "
            "95 % intervals on the same items)",
            yaxis_title="change (up is better)",
        )
        out.append(fig)
    return out


def _drift_over_steps(run: dict):
    """KL(θ0 ‖ θ) per token at each validation point (eval.drift), on the task's answers and general text."""
    import plotly.graph_objects as go

    names = {"kl_task": "held-out task answers", "kl_general": "general text"}
    fig = go.Figure()
    for key, label in names.items():
        x, y = _series(run["metrics"], key)
        if x:
            fig.add_trace(go.Scatter(x=x, y=y, name=label, mode="lines+markers"))
    fig.update_layout(
        title="Drift from θ0: KL(θ0 ‖ θ) per token (θ0's top-k kept before step 1; a lower bound)",
        xaxis_title="step",
        yaxis_title="nats per token",
    )
    return fig if fig.data else None


def _changes_over_steps(run: dict):
    """Each probe's paired change from θ0 (up is better) at every step with records, ± its 95 % interval."""
    import plotly.graph_objects as go

    steps = records.steps(run["dir"])
    first = records.read(run["dir"], 0) if steps and steps[0] == 0 else None
    if not first or len(steps) < 2:
        return None
    series: dict[str, list] = {}
    for step in steps[1:]:
        for name, change in record_changes(first, records.read(run["dir"], step) or {}).items():
            series.setdefault(name, []).append((step, *gain(change)))
    fig = go.Figure()
    for name, points in series.items():
        x, y, ci = zip(*points)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                name=name,
                mode="lines+markers",
                error_y=dict(
                    type="data", array=[c[1] - v for v, c in zip(y, ci)], arrayminus=[v - c[0] for v, c in zip(y, ci)]
                ),
            )
        )
    fig.update_layout(
        title="General skills during training: paired change from θ0 (points, or −% NLL), 95 % intervals",
        xaxis_title="step",
        yaxis_title="change (up is better)",
    )
    return fig


def _scores_over_steps(run: dict):
    """The probes' headline scores over the steps (θ0, during, θ*), from metrics.jsonl."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    results = run["results"] or {}
    during = [r for r in run["metrics"] if isinstance(r.get("probes"), dict)]
    if not during:
        return None
    kinds = {
        name: (results.get("forgetting") or {}).get("probes", {}).get(name, {}).get("metric", "acc")
        for name in during[0]["probes"]
    }
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("accuracy probes (higher is better)", "NLL probes (lower is better)")
    )
    for name, kind in kinds.items():
        xs = [r["step"] for r in during if name in r["probes"]]
        ys = [r["probes"][name] for r in during if name in r["probes"]]
        fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers"), row=1, col=1 if kind == "acc" else 2)
    fig.update_layout(title="General skills before, during and after training", xaxis_title="step")
    return fig


def summary_rows(run: dict) -> list[tuple[str, str]]:
    r, m = run["results"], run["metrics"]
    steps = [x["step"] for x in m if "loss" in x]
    rows = [
        ("status", "finished" if r else "in progress or interrupted: a partial report (no results.json yet)"),
        ("steps logged", f"{len(steps)} (last {steps[-1]})" if steps else "none"),
    ]
    if not r:
        return rows
    rows += [
        ("tokens seen", f"{r.get('tokens_seen', 0):,} ({r.get('target_tokens_seen', 0):,} with loss)"),
        ("training time", f"{r.get('train_time_s', 0):.0f} s"),
    ]
    if r.get("final_val_loss") is not None:
        rows.append(("final validation loss", f"{r['final_val_loss']:.4f}"))
    t0, t1 = r.get("task_accuracy_theta0"), r.get("task_accuracy_final")
    if t0 and t1:
        rows.append(("task accuracy θ0 → θ*", task_change(r)))
    if r.get("memory"):
        rows.append(
            (
                "memory peak",
                f"{r['memory']['measured_peak_gb']:.3g} GB measured, "
                f"{r['memory']['predicted_peak_gb']:.3g} GB predicted",
            )
        )
    if r.get("budget"):
        rows.append(("forgetting budget", budget_verdict(r["budget"])))
    if r.get("wise_budget"):
        w = r["wise_budget"]
        rows.append(
            (
                "WiSE-FT inside the budget",
                f"largest α {w['alpha']:.3f}"
                + (f", task {100 * w['task_accuracy']:.1f}%" if w.get("task_accuracy") is not None else "")
                + " (fulltune interpolate)",
            )
        )
    rows += [
        ("skipped steps (non-finite)", str(r.get("skipped_steps", 0))),
        ("diverged", json.dumps(r["diverged"]) if r.get("diverged") else "no"),
    ]
    return rows


def _table(rows) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


def page(run: dict) -> str:
    import plotly.io as pio

    figures = training_figures(run) + [f for f in [memory_figure(run["results"])] if f] + forgetting_figures(run)
    charts = [
        pio.to_html(f, include_plotlyjs=(i == 0), full_html=False, default_height=420, div_id=f"chart-{i}")
        for i, f in enumerate(figures)
    ]
    data = (run["results"] or {}).get("data")
    name = html.escape(str(run["dir"]))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fulltune report: " + name + "</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}.partial{background:#fff3cd;padding:.5em}</style>"
        "</head><body><h1>fulltune run "
        + name
        + "</h1>"
        + (
            ""
            if run["results"]
            else "<p class='partial' id='partial'>Partial report: the run is in progress or "
            "was interrupted (no results.json yet).</p>"
        )
        + _table(summary_rows(run))
        + "".join(charts)
        + ("<h2>Data</h2>" + _table(_flat(data)) if data else "")
        + "<h2>Resolved config</h2><pre>"
        + html.escape(run["config"])
        + "</pre></body></html>"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """RUN/report.html (or `out`), written whole: a temporary file renamed over the old one."""
    run = read_run(run_dir)
    out = out or run_dir / "report.html"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page(run), encoding="utf-8")
    tmp.replace(out)
    return out


def task_change(results: dict) -> str:
    """ "θ0 → θ* accuracy, the paired change [95 % interval], p, verdict (n)"."""
    t0, t1 = results["task_accuracy_theta0"], results["task_accuracy_final"]
    task = (results.get("forgetting") or {}).get("task")
    if not task:  # results.json from before paired records
        task = {"unit": "points", "change": 100 * (t1["accuracy"] - t0["accuracy"])}
    return f"{100 * t0['accuracy']:.1f}% → {100 * t1['accuracy']:.1f}%, {describe_change(task)} (n={t1['n']})"


def largest_probe_change(results: dict) -> str | None:
    """The probe that moved most in budget units (accuracy points, or % of NLL), with its interval,
    and how many probes lost or gained."""
    probes = (results.get("forgetting") or {}).get("probes") or {}
    if not probes:
        return None
    name, row = max(probes.items(), key=lambda kv: abs(gain(kv[1])[0]))
    verdicts = [p.get("verdict") for p in probes.values()]
    tally = f"; {verdicts.count('lost')} lost, {verdicts.count('gained')} gained of {len(probes)}"
    return f"{name} {describe_change(row)}{tally if 'ci95' in row else ''}"


def budget_verdict(budget: dict) -> str:
    best, limits = budget["best"], ", ".join(f"{k} {v:g}" for k, v in budget["limits"].items())
    rule = f", rule {budget['rule']}" if budget.get("rule") else ""
    if best is None:
        return f"no checked step stays inside ({limits}{rule}); only θ0 does"
    return f"step {best['step']} kept (task {100 * best['task_accuracy']:.1f}%, limits {limits}{rule}) → {best['path']}"


def summary_lines(results: dict) -> list[str]:
    """The end of `fulltune train`: time, tokens, peak memory, task gain, largest probe change."""
    rows = [
        ("time", f"{results.get('train_time_s', 0):.0f} s of training, {results.get('steps', 0)} steps"),
        ("tokens", f"{results.get('tokens_seen', 0):,} ({results.get('target_tokens_seen', 0):,} with loss)"),
    ]
    mem = results.get("memory")
    if mem:
        rows.append(
            ("peak memory", f"{mem['measured_peak_gb']:.2f} GB measured, {mem['predicted_peak_gb']:.2f} GB predicted")
        )
    t0, t1 = results.get("task_accuracy_theta0"), results.get("task_accuracy_final")
    if t0 and t1:
        rows.append(("task accuracy", task_change(results)))
    probe = largest_probe_change(results)
    if probe:
        rows.append(("largest probe change", probe))
    if results.get("budget"):
        rows.append(("forgetting budget", budget_verdict(results["budget"])))
    return [f"  {k:<21} {v}" for k, v in rows]


def at_end_of_run(run_dir: Path, results: dict, write_html: bool) -> None:
    """A finished `fulltune train`: report.html (train.report; a failure is said, and the run stays
    finished), then the summary."""
    if write_html:
        try:
            print(f"[train] report: {write_report(run_dir)}", flush=True)
        except Exception as exc:  # noqa: BLE001 — the trained model and results are already written
            print(
                f"[train] warning: report.html was not written ({type(exc).__name__}: {exc}); "
                f"retry with fulltune report {run_dir}",
                flush=True,
            )
    print("\n".join(["[train] summary"] + summary_lines(results)), flush=True)
