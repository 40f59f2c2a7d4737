"""Scoring the model during a run, and when: `Evaluator` says which steps are validated and probed;
the task accuracy and the general-skill probes of θ0 before training, at `eval.probe_interval`
steps (with the forgetting budget) and of θ* at the end, and the forgetting report. `run` is
run_setup.Run."""

from __future__ import annotations

import torch

from fulltune import distributed as D
from fulltune.data.loader import collate_or_null, count_targets
from fulltune.evals import budget, records, theta0
from fulltune.evals.classify import label_accuracy
from fulltune.evals.drift import kl_and_nll, kl_report
from fulltune.evals.forgetting import forgetting_report, headline, render_report
from fulltune.loss import loss_sum


class Evaluator:
    """Validation loss every `train.val_interval` steps, the probes (and the budget's check) every
    `eval.probe_interval` steps; never at the last step, which the end of the run scores anyway."""

    def __init__(self, val_interval: int, probe_interval: int, total_steps: int, has_val: bool, has_probes: bool):
        self.val_interval = val_interval if has_val else 0
        self.probe_interval = probe_interval if has_probes else 0
        self.total_steps = total_steps

    def validation_due(self, step: int) -> bool:
        return bool(self.val_interval) and step % self.val_interval == 0 and step < self.total_steps

    def probes_due(self, step: int) -> bool:
        return bool(self.probe_interval) and step % self.probe_interval == 0 and step < self.total_steps


@torch.no_grad()
def validation_loss(run) -> float:
    """Mean token loss over the held-out sequences (each rank its share, summed)."""
    examples = run.data.val
    was_training = run.model.training
    run.model.eval()
    total, n = 0.0, 0
    bs = run.cfg.train.micro_batch_size
    chunks = [list(range(start, min(start + bs, len(examples)))) for start in range(0, len(examples), bs)]
    for idx in D.my_share(chunks, bs):  # every chunk when there is one rank
        batch = collate_or_null([examples[i] for i in idx], examples[0], run.tokenizer.pad_token_id, run.device)
        with run.autocast():
            total += float(loss_sum(run.model, batch))
        n += count_targets(batch)
    run.model.train(was_training)
    total, n = D.all_sum([total, n])
    return total / n


def validate(run) -> dict:
    """A validation point: the held-out loss, and the drift from θ0 (`kl_task`, `kl_general`: KL(θ0 ‖ θ)
    per token, evals/drift.py) where measured. The task reference holds the validation sequences at
    their target positions, so one forward gives both the validation loss and `kl_task`."""
    refs, out = dict(run.drift), {}
    if "task" in refs:
        kl, out["val_loss"] = kl_and_nll(run.model, refs.pop("task"), run.autocast, run.cfg.eval.batch_size)
        out["kl_task"] = kl
    elif run.data.val:
        out["val_loss"] = validation_loss(run)
    return {**out, **kl_report(run.model, refs, run.autocast, run.cfg.eval.batch_size)}


def task_accuracy(run, tag: str) -> dict:
    """Accuracy of the model as it is now on the task records, per-item records included (printed)."""
    cfg = run.cfg.eval
    result = label_accuracy(
        run.model,
        run.tokenizer,
        run.data.task,
        source=run.data.task_source,
        labels=list(cfg.labels),
        batch_size=cfg.batch_size,
        autocast=run.autocast,
        desc=f"task eval {tag}" if run.progress else "",
    )
    _print_task(result, tag)
    return result


def _print_task(result: dict, tag: str) -> None:
    print(
        f"[eval] {tag} task accuracy {100 * result['accuracy']:.1f}% "
        f"({result['correct']}/{result['n']}, ±{100 * result['stderr']:.1f} s.e.)",
        flush=True,
    )


def run_probes(run, tag: str) -> dict:
    """Score the general-skill probes on the model as it is now, per-item records included; one line."""
    result = run.data.probes.run(run.model, run.autocast, run.cfg.eval.batch_size, run.progress)
    _print_probes(result, tag)
    return result


def _print_probes(result: dict, tag: str) -> None:
    parts = []
    for name, summary in result.items():
        if not name.startswith("_"):
            metric, value = headline(summary)
            parts.append(f"{name} {100 * value:.1f}%" if metric == "acc" else f"{name} NLL {value:.3f}")
    print(f"[probes] {tag}: " + ", ".join(parts) + f" ({result['_seconds']:.0f} s)", flush=True)


def headlines(result: dict) -> dict:
    return {name: headline(summary)[1] for name, summary in result.items() if not name.startswith("_")}


def keep(run, step: int, part: str, result: dict) -> dict:
    """Write a scoring's per-item records for `step` into RUN/records/; return its summary."""
    summary, items = records.split(result)
    records.write(run.run_dir, step, part, items.get("", items))
    return summary


def before_training(run) -> None:
    """θ0's task accuracy and probe scores (a new run only: a resumed one has them in its state),
    from the cache of an earlier run on the same θ0 when it has them; what the probes can detect."""
    results, data = run.state.results, run.data
    if data.task is not None:
        what = [list(data.task), list(run.cfg.eval.labels)]
        result, hit = theta0.cached(run, "task", what, lambda: task_accuracy(run, "θ0"))
        if hit:
            _print_task(result, "θ0 (cached)")
        results.task_accuracy_theta0 = keep(run, 0, "task", result)
    if data.probes is not None:
        result, hit = theta0.cached(run, "probes", data.probes.fingerprint(), lambda: run_probes(run, "θ0"))
        if hit:
            _print_probes(result, "θ0 (cached)")
        results.probes_theta0 = keep(run, 0, "probes", result)
        run.metrics.append({"step": 0, "probes": headlines(results.probes_theta0)})
        results.detectable = theta0.detectable(results.probes_theta0)
        print("\n".join(theta0.detectable_lines(results.detectable)), flush=True)


def probe_step(run, step: int) -> dict:
    """A probed step: the probes' headline scores and, with a forgetting budget, its verdict."""
    probes = keep(run, step, "probes", run_probes(run, f"step {step}"))
    out = {"probes": headlines(probes)}
    if run.cfg.eval.forgetting_budget:
        task = keep(run, step, "task", task_accuracy(run, f"step {step}"))
        out["budget"] = budget.check_step(run, step, probes, task)
    return out


def after_training(run) -> None:
    """θ*'s task accuracy and probes, the forgetting report and the budget's verdict, into the results."""
    results, step = run.state.results, run.state.step
    if run.data.task is not None:
        results.task_accuracy_final = keep(run, step, "task", task_accuracy(run, "θ*"))
    if run.data.probes is not None:
        results.probes_final = keep(run, step, "probes", run_probes(run, "θ*"))
        run.metrics.append({"step": step, "probes": headlines(results.probes_final)})
    results.forgetting = report_changes(run)
    if results.forgetting is not None:
        print(render_report(results.forgetting), flush=True)
    if run.data.probes is not None:
        budget.finish(run)


def report_changes(run) -> dict | None:
    """The forgetting report, θ0 → θ*, paired on the items of RUN/records/ (None without θ0's scores)."""
    results, step = run.state.results, run.state.step
    first, last = records.read(run.run_dir, 0) or {}, records.read(run.run_dir, step) or {}
    task = None
    if results.task_accuracy_final is not None:
        if results.task_accuracy_theta0 is None:
            print("[eval] no θ0 task accuracy for this run (task eval was off when it started)", flush=True)
        else:
            task = {"before": {**results.task_accuracy_theta0, "items": first.get("task")},
                    "after": {**results.task_accuracy_final, "items": last.get("task")}}  # fmt: skip
    if results.probes_final is not None and results.probes_theta0 is None:
        print("[forgetting] no θ0 probe scores for this run (probes were off when it started)", flush=True)
    probes = results.probes_final is not None and results.probes_theta0 is not None
    if not probes and task is None:
        return None
    items = (first.get("probes") or {}, last.get("probes") or {})
    return forgetting_report(results.probes_theta0 or {}, results.probes_final or {}, items, task)
