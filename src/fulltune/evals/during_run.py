"""Scoring the model during a run, and when: `Evaluator` says which steps are validated and probed;
the task accuracy and the general-skill probes of θ0 before training, at `eval.probe_interval`
steps (with the forgetting budget) and of θ* at the end, and the forgetting report. `run` is
run_setup.Run."""

from __future__ import annotations

import torch

from fulltune import distributed as D
from fulltune.data.loader import collate_or_null, count_targets
from fulltune.evals import budget
from fulltune.evals.classify import label_accuracy
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


def task_accuracy(run, tag: str) -> dict:
    """Accuracy of the model as it is now on the task records (printed and returned)."""
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
    print(
        f"[eval] {tag} task accuracy {100 * result['accuracy']:.1f}% "
        f"({result['correct']}/{result['n']}, ±{100 * result['stderr']:.1f} s.e.)",
        flush=True,
    )
    return result


def run_probes(run, tag: str) -> dict:
    """Score the general-skill probes on the model as it is now; print one line."""
    result = run.data.probes.run(run.model, run.autocast, run.cfg.eval.batch_size, run.progress)
    parts = []
    for name, summary in result.items():
        if not name.startswith("_"):
            metric, value = headline(summary)
            parts.append(f"{name} {100 * value:.1f}%" if metric == "acc" else f"{name} NLL {value:.3f}")
    print(f"[probes] {tag}: " + ", ".join(parts) + f" ({result['_seconds']:.0f} s)", flush=True)
    return result


def headlines(result: dict) -> dict:
    return {name: headline(summary)[1] for name, summary in result.items() if not name.startswith("_")}


def before_training(run) -> None:
    """θ0's task accuracy and probe scores (a new run only: a resumed one has them in its state)."""
    results = run.state.results
    if run.data.task is not None:
        results.task_accuracy_theta0 = task_accuracy(run, "θ0")
    if run.data.probes is not None:
        results.probes_theta0 = run_probes(run, "θ0")
        run.metrics.append({"step": 0, "probes": headlines(results.probes_theta0)})


def probe_step(run, step: int) -> dict:
    """A probed step: the probes' headline scores and, with a forgetting budget, its verdict."""
    out = {"probes": headlines(run_probes(run, f"step {step}"))}
    if run.cfg.eval.forgetting_budget:
        out["budget"] = budget.check_step(run, step, out["probes"], task_accuracy(run, f"step {step}")["accuracy"])
    return out


def after_training(run) -> None:
    """θ*'s task accuracy and probes, the forgetting report and the budget's verdict, into the results."""
    results = run.state.results
    if run.data.task is not None:
        results.task_accuracy_final = task_accuracy(run, "θ*")
        report_task(results)
    if run.data.probes is None:
        return
    results.probes_final = run_probes(run, "θ*")
    run.metrics.append({"step": run.state.step, "probes": headlines(results.probes_final)})
    if results.probes_theta0 is None:
        print("[forgetting] no θ0 probe scores for this run (probes were off when it started)", flush=True)
        return
    task = None
    if results.task_accuracy_theta0 is not None and results.task_accuracy_final is not None:
        task = {"before": results.task_accuracy_theta0["accuracy"], "after": results.task_accuracy_final["accuracy"]}
    results.forgetting = forgetting_report(results.probes_theta0, results.probes_final, task)
    print(render_report(results.forgetting), flush=True)
    budget.finish(run)


def report_task(results) -> None:
    if results.task_accuracy_theta0 is None:
        print("[eval] no θ0 task accuracy for this run (task eval was off when it started)", flush=True)
        return
    before, after = results.task_accuracy_theta0, results.task_accuracy_final
    print(
        f"[eval] task accuracy: θ0 {100 * before['accuracy']:.1f}% → fine-tuned {100 * after['accuracy']:.1f}% "
        f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points, n={after['n']}, "
        f"±{100 * after['stderr']:.1f} s.e.)",
        flush=True,
    )
