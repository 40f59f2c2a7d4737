"""A forgetting budget (`eval.forgetting_budget`): the most each probe may lose from θ0 — accuracy
points for a multiple-choice probe (`arc_easy: 2`: at most −2 points), % of NLL per token for a
code / text probe (`humaneval: 5`: at most +5 %).

With `eval.probe_interval`, every probed step is checked against it, with the task accuracy at that
step; the best task score inside the budget is exported to RUN/best-in-budget/ (an HF directory,
like final/); a tie goes to the one that lost less on its worst probe. θ* is checked at the end too.
results.json's `budget` names the step kept, its task accuracy and its losses, and every step
checked."""

from __future__ import annotations

from fulltune.checkpoint import export_hf
from fulltune.evals.forgetting import gain, headline
from fulltune.state import BudgetTrack

BEST = "best-in-budget"


def losses(theta0: dict, now: dict) -> dict[str, float]:
    """Per probe, how much it lost from θ0 in budget units (positive: worse). `theta0` holds the full
    probe results, `now` the headline value per probe (accuracy or NLL per token)."""
    out = {}
    for name, value in now.items():
        before = theta0.get(name)
        if isinstance(before, dict):
            metric, was = headline(before)
            out[name] = -gain({"metric": metric, "before": was, "change": value - was})[0]
    return out


def within(budget: dict, lost: dict) -> bool:
    return all(lost.get(name, float("inf")) <= limit + 1e-9 for name, limit in budget.items())  # 1e-9: rounding


def better(entry: dict, best: dict | None) -> bool:
    """Inside the budget and a higher task score; on a tie, the one that lost less on its worst probe."""

    def key(e):
        return e["task_accuracy"], -max(e["losses"].values(), default=0.0)

    return entry["in_budget"] and (best is None or key(entry) > key(best))


def _describe(entry: dict, budget: dict) -> str:
    parts = [
        f"{name} {entry['losses'][name]:+.1f} (limit {limit:g})"
        for name, limit in budget.items()
        if name in entry["losses"]
    ]
    return f"task {100 * entry['task_accuracy']:.1f}%; lost, in points or % NLL: " + ", ".join(parts)


def check_step(run, step: int, probes_now: dict, task_accuracy: float) -> dict:
    """A probed step: its losses and its task accuracy; when it is inside the budget and the best so
    far, the model is exported to RUN/best-in-budget/ (an HF directory, like final/)."""
    limits = run.cfg.eval.forgetting_budget
    lost = losses(run.state.results.probes_theta0 or {}, probes_now)
    entry = {"step": step, "task_accuracy": task_accuracy, "losses": lost, "in_budget": within(limits, lost)}
    track = run.state.budget = run.state.budget or BudgetTrack()
    track.checked.append(entry)
    if better(entry, track.best):
        track.best = dict(entry, path=str(export_hf(run.model, run.tokenizer, run.run_dir / BEST)))
        print(
            f"[budget] step {step} is the best inside the budget so far ({_describe(entry, limits)}): "
            f"{track.best['path']}",
            flush=True,
        )
    elif not entry["in_budget"]:
        print(f"[budget] step {step} is outside the budget ({_describe(entry, limits)})", flush=True)
    return {"task_accuracy": entry["task_accuracy"], "in_budget": entry["in_budget"]}


def finish(run) -> None:
    """θ* against the budget (it is final/ when it is inside and at least as good), and the verdict."""
    limits, results = run.cfg.eval.forgetting_budget, run.state.results
    if not limits or results.probes_final is None or results.task_accuracy_final is None:
        return
    now = {n: headline(s)[1] for n, s in results.probes_final.items() if not n.startswith("_")}
    lost = losses(results.probes_theta0 or {}, now)
    final = {
        "step": run.state.step,
        "task_accuracy": results.task_accuracy_final["accuracy"],
        "losses": lost,
        "in_budget": within(limits, lost),
        "path": str(run.run_dir / "final"),
    }
    track = run.state.budget or BudgetTrack()
    checked, best = [*track.checked, final], track.best
    if better(final, best):
        best = final
    results.budget = {"limits": dict(limits), "best": best, "checked": checked}
    if best is None:
        print(
            f"[budget] no checked step stays inside the budget (θ*: {_describe(final, limits)}); only θ0 does",
            flush=True,
        )
    else:
        print(f"[budget] kept: step {best['step']} ({_describe(best, limits)}) → {best['path']}", flush=True)
