"""A forgetting budget (`eval.forgetting_budget`): the most each probe may lose from θ0 — accuracy
points for a multiple-choice probe (`arc_easy: 2`: at most −2 points), % of NLL per token for a
code / text probe (`humaneval: 5`: at most +5 %).

Each probe's loss is its paired change from θ0 on the same items, with a 95 % interval
(evals/paired.py), and `eval.budget_rule` says how it is held to its limit:
- significant (default): over the limit only when the whole interval is beyond it, so a step is
  inside when its point estimate is inside, and also when it is beyond but not significantly so;
- strict: inside only when the whole interval is inside the limit;
- point: the point estimate alone (noise decides near the limit).
A probe without per-item records on both sides (a run started before they existed) is held by its
point estimate, whatever the rule.

With `eval.probe_interval`, every probed step is checked against it, with the task accuracy at that
step; the best task score inside the budget is exported to RUN/best-in-budget/ (an HF directory,
like final/); a tie goes to the one that lost less on its worst probe. θ* is checked at the end too.
results.json's `budget` names the rule, the step kept, its task accuracy, its losses with their
intervals and each probe's decision, and every step checked."""

from __future__ import annotations

from fulltune import distributed as D
from fulltune.checkpoint import export_hf
from fulltune.evals import records
from fulltune.evals.forgetting import forgetting_report, gain
from fulltune.state import BudgetTrack

BEST = "best-in-budget"


def losses(rows: dict) -> dict[str, dict]:
    """Per probe of a forgetting report's rows: its loss in budget units (positive: worse) and the
    loss's 95 % interval (None when unpaired)."""
    out = {}
    for name, row in rows.items():
        value, ci = gain(row)
        out[name] = {"loss": -value, "ci95": [-ci[1], -ci[0]] if ci else None}
    return out


def within(limit: float, loss: dict, rule: str) -> bool:
    """Is one probe's loss inside its limit under `rule`? (1e-9: rounding)"""
    ci = loss["ci95"]
    if ci is None or rule == "point":
        return loss["loss"] <= limit + 1e-9
    return (ci[0] if rule == "significant" else ci[1]) <= limit + 1e-9


def judge(limits: dict, lost: dict, rule: str) -> tuple[bool, dict[str, bool]]:
    """(inside the whole budget, each limited probe's decision); a limited probe not scored is outside."""
    each = {name: name in lost and within(limit, lost[name], rule) for name, limit in limits.items()}
    return all(each.values()), each


def better(entry: dict, best: dict | None) -> bool:
    """Inside the budget and a higher task score; on a tie, the one that lost less on its worst probe."""

    def key(e):
        return e["task_accuracy"], -max((v["loss"] for v in e["losses"].values()), default=0.0)

    return entry["in_budget"] and (best is None or key(entry) > key(best))


def _describe(entry: dict, budget: dict) -> str:
    parts = []
    for name, limit in budget.items():
        if name in entry["losses"]:
            loss = entry["losses"][name]
            ci = f" [{loss['ci95'][0]:+.1f}, {loss['ci95'][1]:+.1f}]" if loss["ci95"] else ""
            parts.append(f"{name} {loss['loss']:+.1f}{ci} (limit {limit:g}{'' if entry['within'][name] else ', over'})")
    return f"task {100 * entry['task_accuracy']:.1f}%; lost, in points or % NLL: " + ", ".join(parts)


def entry_for(run, step: int, probes_now: dict, task_accuracy: float) -> dict:
    """One checked step: each probe's loss from θ0 paired on RUN/records/, and the rule's decision.
    Rank 0 (which wrote the records) decides, and every rank gets its entry: the export that may
    follow is collective."""
    return D.broadcast(_entry(run, step, probes_now, task_accuracy) if D.is_main() else None)


def _entry(run, step: int, probes_now: dict, task_accuracy: float) -> dict:
    cfg = run.cfg.eval
    first, now = records.read(run.run_dir, 0) or {}, records.read(run.run_dir, step) or {}
    items = (first.get("probes") or {}, now.get("probes") or {})
    rows = forgetting_report(run.state.results.probes_theta0 or {}, probes_now, items)["probes"]
    lost = losses(rows)
    inside, each = judge(cfg.forgetting_budget, lost, cfg.budget_rule)
    return {"step": step, "task_accuracy": task_accuracy, "losses": lost, "within": each, "in_budget": inside}


def check_step(run, step: int, probes_now: dict, task_now: dict) -> dict:
    """A probed step: its losses and its task accuracy; when it is inside the budget and the best so
    far, the model is exported to RUN/best-in-budget/ (an HF directory, like final/)."""
    limits = run.cfg.eval.forgetting_budget
    entry = entry_for(run, step, probes_now, task_now["accuracy"])
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
    cfg, results = run.cfg.eval, run.state.results
    limits = cfg.forgetting_budget
    if not limits or results.probes_final is None or results.task_accuracy_final is None:
        return
    final = entry_for(run, run.state.step, results.probes_final, results.task_accuracy_final["accuracy"])
    final["path"] = str(run.run_dir / "final")
    track = run.state.budget or BudgetTrack()
    checked, best = [*track.checked, final], track.best
    if better(final, best):
        best = final
    results.budget = {"limits": dict(limits), "rule": cfg.budget_rule, "best": best, "checked": checked}
    if best is None:
        print(
            f"[budget] no checked step stays inside the budget (rule {cfg.budget_rule}; θ*: "
            f"{_describe(final, limits)}); only θ0 does",
            flush=True,
        )
    else:
        print(
            f"[budget] kept (rule {cfg.budget_rule}): step {best['step']} ({_describe(best, limits)}) → {best['path']}",
            flush=True,
        )
