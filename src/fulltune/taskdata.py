"""The run's data: tokenised train / validation examples and the task-accuracy records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from fulltune.assets import resolve_data_path
from fulltune.config import RunConfig
from fulltune.data.formats import Example, encode_dataset
from fulltune.data.sources import load_records
from fulltune.errors import UserError
from fulltune.evals.classify import gold_labels, label_accuracy
from fulltune.evals.forgetting import ProbeSet, forgetting_report, headline, render_report


@dataclass
class TaskData:
    train: list[Example]
    val: list[Example]
    task: object | None   # datasets.Dataset of records scored for task accuracy
    task_source: str
    stats: dict
    probes: ProbeSet | None = None
    general: list[Example] = field(default_factory=list)  # data.general: mixing and the EWC Fisher


def read_sources(cfg: RunConfig) -> dict[str, tuple[str, object]]:
    """Every data file the run needs, read and checked before the model is loaded."""
    named = {"train": cfg.data.train, "validation": cfg.data.validation, "task": cfg.eval.task_file}
    named.update({f"general:{i}": spec for i, spec in enumerate(cfg.data.general)})
    return {role: (path, load_records(path)) for role, path in
            ((role, resolve_data_path(spec)) for role, spec in named.items() if spec)}


def load_task_data(cfg: RunConfig, tokenizer, sources: dict) -> TaskData:
    d = cfg.data
    train_path, train_ds = sources["train"]
    train, train_stats = encode_dataset(train_ds, tokenizer, d, train_path)
    print(f"[data] train {train_path}: {train_stats.line()}", flush=True)
    stats = {"train": asdict(train_stats)}
    val: list[Example] = []
    if "validation" in sources:
        val_path, val_ds = sources["validation"]
        val, val_stats = encode_dataset(val_ds, tokenizer, d, val_path)
        print(f"[data] validation {val_path}: {val_stats.line()}", flush=True)
        stats["validation"] = asdict(val_stats)
    elif d.val_fraction > 0:
        # A seeded hold-out: the same seed holds out the same examples.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        n_val = max(1, round(d.val_fraction * len(train)))
        if n_val >= len(train):
            raise UserError(f"{train_path}: data.val_fraction={d.val_fraction} leaves no training sequences "
                            f"({len(train)} usable)")
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
        print(f"[data] held out {len(val)} of the training sequences for validation", flush=True)
    stats["n_train"], stats["n_val"] = len(train), len(val)
    task_source, task = sources.get("task", ("", None))
    if task is not None:
        gold_labels(task, task_source, list(cfg.eval.labels))  # a bad task file fails before training starts
    general = _general_examples(cfg, tokenizer, sources, stats)
    probes = None
    if cfg.eval.probes:
        probes = ProbeSet(list(cfg.eval.probes), tokenizer, cfg.eval.probe_items, cfg.eval.probe_code_items)
        print(f"[data] probes: {', '.join(f'{p.name} ({len(p.items)})' for p in probes.probes)}", flush=True)
    return TaskData(train, val, task, task_source, stats, probes, general)


def _general_examples(cfg: RunConfig, tokenizer, sources: dict, stats: dict) -> list[Example]:
    """data.general, every token carrying loss (it stands for the model's pre-training data)."""
    general: list[Example] = []
    as_text = replace(cfg.data, format="auto", loss_on="all")
    for i in range(len(cfg.data.general)):
        path, ds = sources[f"general:{i}"]
        examples, general_stats = encode_dataset(ds, tokenizer, as_text, path)
        print(f"[data] general {path}: {general_stats.line()}", flush=True)
        stats.setdefault("general", []).append(asdict(general_stats))
        general += examples
    return general


def task_accuracy(run, tag: str) -> dict:
    """Accuracy of the model as it is now on the task records (printed and returned)."""
    cfg = run.cfg.eval
    result = label_accuracy(run.model, run.tokenizer, run.data.task, run.data.task_source, list(cfg.labels),
                            cfg.batch_size, run.autocast, desc=f"task eval {tag}" if run.cfg.train.progress else "")
    print(f"[eval] {tag} task accuracy {100 * result['accuracy']:.1f}% "
          f"({result['correct']}/{result['n']}, ±{100 * result['stderr']:.1f} s.e.)", flush=True)
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
        task = {"before": results["task_accuracy_theta0"]["accuracy"], "after": results["task_accuracy_final"]["accuracy"]}
    results["forgetting"] = forgetting_report(results["probes_theta0"], results["probes_final"], task)
    print(render_report(results["forgetting"]), flush=True)


def report_task(results: dict) -> None:
    if "task_accuracy_theta0" not in results:
        print("[eval] no θ0 task accuracy for this run (task eval was off when it started)", flush=True)
        return
    before, after = results["task_accuracy_theta0"], results["task_accuracy_final"]
    print(f"[eval] task accuracy: θ0 {100 * before['accuracy']:.1f}% → fine-tuned {100 * after['accuracy']:.1f}% "
          f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points, n={after['n']}, "
          f"±{100 * after['stderr']:.1f} s.e.)", flush=True)
