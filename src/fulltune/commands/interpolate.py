"""`fulltune interpolate THETA0 FINETUNED`: WiSE-FT, θ(α) = (1 − α)·θ0 + α·θ*, scored at each α.

For every α the task accuracy and the general-skill probes are measured, giving the trade-off
curve between what fine-tuning learned (α = 1) and what θ0 knew (α = 0). Writes a table
(markdown + JSON) and a PNG of task score against general score.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fulltune.commands import add_precision
from fulltune.errors import UserError


def register(sub) -> None:
    i = sub.add_parser("interpolate", help="WiSE-FT: blend θ0 and a fine-tuned model, score task and probes per α")
    i.add_argument("theta0", help="θ0: HF model dir, .gguf or 'default'")
    i.add_argument("finetuned", help="the fine-tuned model (e.g. runs/NAME/final)")
    i.add_argument(
        "--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated α in [0, 1] (default 0,0.25,0.5,0.75,1)"
    )
    i.add_argument("--config", help="run config for the task and probe settings (default: FINETUNED/../config.yaml)")
    i.add_argument("--task-file", help="task records scored for accuracy (overrides the config's eval.task_file)")
    i.add_argument("--labels", help="comma-separated label set (overrides eval.labels)")
    i.add_argument("--probes", help="comma-separated probes (overrides eval.probes)")
    i.add_argument("--items", type=int, help="items per multiple-choice probe (overrides eval.probe_items)")
    i.add_argument("--code-items", type=int, help="items per code / text probe (overrides eval.probe_code_items)")
    add_precision(i)
    i.add_argument("--out", default="interpolate", help="output directory (table, JSON, PNG)")
    i.add_argument("--save-models", action="store_true", help="also save each blended model as OUT/alpha-A")
    i.add_argument(
        "--budget",
        help="a forgetting budget, e.g. '{arc_easy: 2, humaneval: 5}' (points / %% NLL lost "
        "from θ0; default: the run's eval.forgetting_budget): find the largest α inside it",
    )
    i.add_argument(
        "--budget-rule",
        choices=("significant", "strict", "point"),
        help="how each probe's paired change is held to its limit (default: the run's eval.budget_rule)",
    )
    i.add_argument(
        "--search-steps", type=int, default=3, help="bisections past the grid toward the budget's edge (default 3)"
    )
    i.set_defaults(run=run)


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--alphas {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise UserError(f"--alphas {text!r}: every α must be in [0, 1]")
    return alphas


@torch.no_grad()
def blend(model: torch.nn.Module, theta0: dict, finetuned: dict, alpha: float) -> None:
    """Set the model's parameters to (1 − α)·θ0 + α·θ*. α = 0 and α = 1 give the endpoints bit for bit."""
    for name, p in model.named_parameters():
        p.copy_(torch.lerp(theta0[name], finetuned[name], alpha))


def endpoint_weights(theta0_model: torch.nn.Module, ft_model: torch.nn.Module) -> tuple[dict, dict]:
    a = {n: p.detach().clone() for n, p in theta0_model.named_parameters()}
    b = {n: p.detach().clone() for n, p in ft_model.named_parameters()}
    if a.keys() != b.keys() or any(a[n].shape != b[n].shape for n in a):
        diff = sorted(set(a) ^ set(b)) or [n for n in a if a[n].shape != b[n].shape]
        raise UserError(
            f"θ0 and the fine-tuned model have different parameters (e.g. {diff[:3]}): "
            "interpolation needs the same architecture"
        )
    return a, b


def _settings(args):
    from fulltune.config import load_config

    path = args.config or Path(args.finetuned).expanduser().parent / "config.yaml"
    cfg = load_config(path) if args.config or Path(path).is_file() else load_config(None)
    ev = cfg.eval
    task_file = args.task_file if args.task_file is not None else ev.task_file
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else list(ev.labels)
    probes = [x.strip() for x in args.probes.split(",") if x.strip()] if args.probes else list(ev.probes)
    items = args.items or ev.probe_items
    code_items = args.code_items or ev.probe_code_items
    if not task_file and not probes:
        raise UserError("nothing to score: give --task-file/--labels or --probes (or a --config that has them)")
    if task_file and len(labels) < 2:
        raise UserError("task accuracy needs --labels with at least two labels")
    return task_file, labels, probes, items, code_items, ev.batch_size


def _rule(args) -> str:
    """--budget-rule, else the run's eval.budget_rule (docs in evals/budget.py)."""
    from fulltune.config import load_config

    if args.budget_rule:
        return args.budget_rule
    path = args.config or Path(args.finetuned).expanduser().parent / "config.yaml"
    return load_config(path).eval.budget_rule if Path(path).is_file() else "significant"


def _budget(args, probe_names: list[str]) -> dict:
    """--budget (a YAML mapping), else the run's eval.forgetting_budget; its probes must be scored."""
    import yaml

    from fulltune.config import load_config
    from fulltune.evals.probes import probe_name

    if args.budget is None:
        path = args.config or Path(args.finetuned).expanduser().parent / "config.yaml"
        return dict(load_config(path).eval.forgetting_budget) if Path(path).is_file() else {}
    try:
        limits = yaml.safe_load(args.budget)
    except yaml.YAMLError:
        limits = None
    if not isinstance(limits, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in limits.values()
    ):
        raise UserError(f"--budget {args.budget!r}: expected a mapping of probe to limit ≥ 0, e.g. '{{arc_easy: 2}}'")
    missing = sorted(set(limits) - {probe_name(p) for p in probe_names})
    if missing:
        raise UserError(
            f"--budget: {', '.join(missing)} not among the probes scored ({', '.join(probe_names) or 'none'})"
        )
    if args.search_steps < 0:
        raise UserError("--search-steps must be ≥ 0")
    return limits


def _record_in_run(run_dir: Path, found: dict) -> None:
    """When FINETUNED is a run's final/, the α found goes into its results.json and report.html."""
    results = run_dir / "results.json"
    if not results.is_file():
        return
    from fulltune.report import write_report

    data = json.loads(results.read_text())
    data["wise_budget"] = found
    results.write_text(json.dumps(data, indent=1))
    if (run_dir / "report.html").exists():
        write_report(run_dir)
    print(
        f"[interpolate] recorded in {results}" + (" and report.html" if (run_dir / "report.html").exists() else ""),
        flush=True,
    )


def changes(rows: list[dict], row: dict) -> dict:
    """The row's forgetting-report rows: each probe's paired change from the α = 0 row (θ0)."""
    from fulltune.evals.forgetting import forgetting_report

    zero = next(r for r in rows if r["alpha"] == 0)
    items = ((zero.get("items") or {}).get("probes") or {}, (row.get("items") or {}).get("probes") or {})
    return forgetting_report(zero["probes"], row["probes"], items)["probes"]


def budget_search(score, rows: list[dict], limits: dict, steps: int, *, rule: str = "significant") -> dict:
    """The largest α inside the budget under `rule` (evals/budget.py): the grid's largest, then
    `steps` bisections toward the next α outside it. Losses are paired with the α = 0 row (θ0)."""
    from fulltune.evals.budget import judge, losses

    def lost(row):
        return losses(changes(rows, row))

    def inside(row):
        return judge(limits, lost(row), rule)[0]

    ordered = sorted(rows, key=lambda r: r["alpha"])
    best = [r for r in ordered if inside(r)][-1]
    outside = [r for r in ordered if r["alpha"] > best["alpha"] and not inside(r)]
    for _ in range(steps if outside else 0):
        row = score((best["alpha"] + outside[0]["alpha"]) / 2)
        rows.append(row)
        best, outside = (row, outside) if inside(row) else (best, [row])
    found = {
        "limits": limits,
        "rule": rule,
        "alpha": best["alpha"],
        "losses": lost(best),
        "task_accuracy": best["task"]["accuracy"] if "task" in best else None,
    }
    print(
        f"[interpolate] largest α inside the budget (rule {rule}): {best['alpha']:.3f}"
        + (f" (task {100 * found['task_accuracy']:.1f}%" if found["task_accuracy"] is not None else " (")
        + "; lost, in points or % NLL: "
        + ", ".join(f"{k} {_loss(v)}" for k, v in found["losses"].items())
        + ")",
        flush=True,
    )
    return found


def _loss(v: dict) -> str:
    return f"{v['loss']:+.1f}" + (f" [{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}]" if v["ci95"] else "")


def _general_scores(probes: dict) -> dict:
    mc = [s["acc"] for n, s in probes.items() if not n.startswith("_") and s["kind"] == "mc"]
    text = [s["nll_per_token"] for n, s in probes.items() if not n.startswith("_") and s["kind"] != "mc"]
    return {"general_acc": sum(mc) / len(mc) if mc else None, "text_nll": sum(text) / len(text) if text else None}


def run(args) -> None:
    from fulltune.assets import resolve_data_path
    from fulltune.checkpoint import export_hf
    from fulltune.config import ModelConfig
    from fulltune.data.sources import load_records
    from fulltune.evals.classify import gold_labels, label_accuracy
    from fulltune.evals.forgetting import ProbeSet
    from fulltune.evals.records import split
    from fulltune.model import load_theta0
    from fulltune.runtime import autocast_factory, pick_device, resolve_precision

    alphas = parse_alphas(args.alphas)
    task_file, labels, probe_names, items, code_items, batch = _checked_settings(args)
    limits = _budget(args, probe_names)
    task_path = resolve_data_path(task_file) if task_file else ""
    records = load_records(task_path) if task_file else None
    if records is not None:
        gold_labels(records, task_path, labels)  # a bad task file fails before any model loads
    device = pick_device("auto")
    autocast = autocast_factory(resolve_precision(args.precision, device), device)
    model, tokenizer, _ = load_theta0(ModelConfig(path=args.theta0))
    finetuned, _, _ = load_theta0(ModelConfig(path=args.finetuned))
    theta0_w, ft_w = endpoint_weights(model, finetuned)
    del finetuned
    model.to(device).eval()
    probes = ProbeSet(probe_names, tokenizer, items, code_items) if probe_names else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def score(alpha: float) -> dict:
        started = time.perf_counter()
        blend(model, theta0_w, ft_w, alpha)
        row = {"alpha": alpha, "items": {}}  # items: per-item records, for paired changes from α = 0
        if records is not None:
            row["task"], row["items"]["task"] = split(label_accuracy(
                model, tokenizer, records, source=task_path, labels=labels, batch_size=batch, autocast=autocast
            ))  # fmt: skip
            row["items"]["task"] = row["items"]["task"][""]
        if probes is not None:
            row["probes"], row["items"]["probes"] = split(probes.run(model, autocast, batch))
            row.update(_general_scores(row["probes"]))
        row["seconds"] = time.perf_counter() - started
        print(_row_line(row), flush=True)
        if args.save_models:
            export_hf(model, tokenizer, out / f"alpha-{alpha:.2f}")
        return row

    rows = [score(alpha) for alpha in sorted(set(alphas) | ({0.0} if limits else set()))]
    result = {"theta0": args.theta0, "finetuned": args.finetuned, "task_file": task_file, "rows": rows}
    if limits:
        result["budget"] = budget_search(score, rows, limits, args.search_steps, rule=_rule(args))
        rows.sort(key=lambda r: r["alpha"])
        _record_in_run(Path(args.finetuned).expanduser().parent, result["budget"])
    if args.save_models:
        _cards(args, out, rows, device)
    _write_outputs(out, result, with_plot=records is not None and probes is not None)


def _cards(args, out: Path, rows: list[dict], device) -> None:
    """Each saved blend's model card: its scores, and its probes' paired changes from θ0 where α = 0 ran."""
    from fulltune.modelcard import attach, blend_card, hardware

    zero = any(r["alpha"] == 0 for r in rows)
    for row in rows:
        shown = {**row, "changes": changes(rows, row) if zero and "probes" in row else {}}
        attach(
            out / f"alpha-{row['alpha']:.2f}", blend_card(args.theta0, args.finetuned, shown, hardware=hardware(device))
        )


def _write_outputs(out: Path, result: dict, with_plot: bool) -> None:
    """OUT/interpolate.json, .md (also printed) and, with a task and probes, the trade-off PNG."""
    rows = result["rows"]
    (out / "interpolate.json").write_text(json.dumps(result, indent=1))
    (out / "interpolate.md").write_text(table(rows) + "\n")
    print(table(rows))
    if with_plot:
        plot(rows, out / "interpolate.png")
    shown = f"{out / 'interpolate.md'}, interpolate.json" + (", interpolate.png" if with_plot else "")
    print(f"[interpolate] wrote {shown}", flush=True)


def _checked_settings(args):
    """Both models' files, then the task and probe settings (the run's config, overridden by flags)."""
    from fulltune.modelcheck import check_model_path

    check_model_path(args.theta0, False, "THETA0")  # before settings are read or θ0 loads
    check_model_path(args.finetuned, False, "FINETUNED")
    if (args.items is not None and args.items < 1) or (args.code_items is not None and args.code_items < 1):
        raise UserError("--items and --code-items must be ≥ 1")
    return _settings(args)


def _row_line(row: dict) -> str:
    parts = [f"[interpolate] α={row['alpha']:.2f}"]
    if "task" in row:
        parts.append(f"task {100 * row['task']['accuracy']:.1f}%")
    if row.get("general_acc") is not None:
        parts.append(f"general acc {100 * row['general_acc']:.1f}%")
    if row.get("text_nll") is not None:
        parts.append(f"code/text NLL {row['text_nll']:.3f}")
    return ", ".join(parts) + f" ({row['seconds']:.0f} s)"


def table(rows: list[dict]) -> str:
    """Markdown: α, task accuracy, each probe's headline number (with its paired change from α = 0
    and 95 % interval, when there is an α = 0 row with per-item records), general means."""
    names = [n for n in rows[0].get("probes", {}) if not n.startswith("_")]
    paired = any(r["alpha"] == 0 for r in rows) and all(r.get("items") for r in rows) and names
    head = ["α"] + (["task acc"] if "task" in rows[0] else []) + names
    head += ["mean MC acc"] if rows[0].get("general_acc") is not None else []
    head += ["mean NLL"] if rows[0].get("text_nll") is not None else []
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in rows:
        cells = [f"{r['alpha']:.2f}"] + ([f"{100 * r['task']['accuracy']:.1f}%"] if "task" in r else [])
        change = changes(rows, r) if paired and r["alpha"] != 0 else {}
        for n in names:
            s = r["probes"][n]
            cell = f"{100 * s['acc']:.1f}%" if s["kind"] == "mc" else f"{s['nll_per_token']:.3f}"
            cells.append(cell + (f" ({_change(change[n])})" if n in change else ""))
        cells += [f"{100 * r['general_acc']:.1f}%"] if r.get("general_acc") is not None else []
        cells += [f"{r['text_nll']:.3f}"] if r.get("text_nll") is not None else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _change(row: dict) -> str:
    """ "−2.0 [−5.1, +1.0]": a forgetting-report row's paired change and interval (points or % NLL)."""
    ci = row.get("ci95")
    return f"{row['change']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def plot(rows: list[dict], path: Path) -> None:
    """Task accuracy against general skill (mean MC accuracy; mean code/text NLL), one point per α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (k, label)
        for k, label in (
            ("general_acc", "general skill: mean multiple-choice accuracy (%)"),
            ("text_nll", "code/text NLL per token (lower is better)"),
        )
        if rows[0].get(k) is not None
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    task = [100 * r["task"]["accuracy"] for r in rows]
    for ax, (key, label) in zip(axes[0], panels):
        xs = [(100 if key == "general_acc" else 1) * r[key] for r in rows]
        ax.plot(xs, task, "o-")
        for x, y, r in zip(xs, task, rows):
            ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("task accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("WiSE-FT: θ(α) = (1 − α)·θ0 + α·θ*")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
