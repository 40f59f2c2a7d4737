"""Scoring the model during a run: task accuracy and the general-skill probes of θ0, at
`eval.probe_interval` steps and of θ*, and the forgetting report. `run` is train.Run."""

from __future__ import annotations

from fulltune.evals.classify import label_accuracy
from fulltune.evals.forgetting import forgetting_report, headline, render_report


def task_accuracy(run, tag: str) -> dict:
    """Accuracy of the model as it is now on the task records (printed and returned)."""
    cfg = run.cfg.eval
    result = label_accuracy(
        run.model,
        run.tokenizer,
        run.data.task,
        run.data.task_source,
        list(cfg.labels),
        cfg.batch_size,
        run.autocast,
        desc=f"task eval {tag}" if run.cfg.train.progress else "",
    )
    print(
        f"[eval] {tag} task accuracy {100 * result['accuracy']:.1f}% "
        f"({result['correct']}/{result['n']}, ±{100 * result['stderr']:.1f} s.e.)",
        flush=True,
    )
    return result


def run_probes(run, tag: str) -> dict:
    """Score the general-skill probes on the model as it is now; print one line."""
    result = run.data.probes.run(run.model, run.autocast, run.cfg.eval.batch_size, run.cfg.train.progress)
    parts = []
    for name, summary in result.items():
        if not name.startswith("_"):
            metric, value = headline(summary)
            parts.append(f"{name} {100 * value:.1f}%" if metric == "acc" else f"{name} NLL {value:.3f}")
    print(f"[probes] {tag}: " + ", ".join(parts) + f" ({result['_seconds']:.0f} s)", flush=True)
    return result


def headlines(result: dict) -> dict:
    return {name: headline(summary)[1] for name, summary in result.items() if not name.startswith("_")}


def finish_probes(run, results: dict, log) -> None:
    """θ* probe scores (logged with `log`) and, with θ0's, the forgetting report."""
    results["probes_final"] = run_probes(run, "θ*")
    log(run, {"step": run.state["step"], "probes": headlines(results["probes_final"])})
    if "probes_theta0" not in results:
        print("[forgetting] no θ0 probe scores for this run (probes were off when it started)", flush=True)
        return
    task = None
    if "task_accuracy_theta0" in results and "task_accuracy_final" in results:
        task = {
            "before": results["task_accuracy_theta0"]["accuracy"],
            "after": results["task_accuracy_final"]["accuracy"],
        }
    results["forgetting"] = forgetting_report(results["probes_theta0"], results["probes_final"], task)
    print(render_report(results["forgetting"]), flush=True)


def report_task(results: dict) -> None:
    if "task_accuracy_theta0" not in results:
        print("[eval] no θ0 task accuracy for this run (task eval was off when it started)", flush=True)
        return
    before, after = results["task_accuracy_theta0"], results["task_accuracy_final"]
    print(
        f"[eval] task accuracy: θ0 {100 * before['accuracy']:.1f}% → fine-tuned {100 * after['accuracy']:.1f}% "
        f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points, n={after['n']}, "
        f"±{100 * after['stderr']:.1f} s.e.)",
        flush=True,
    )
