"""The run's data: tokenised train / validation / general examples, the task records and the probe set.

Everything here builds examples; `evals/` scores models on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from fulltune.assets import resolve_data_path
from fulltune.config import RunConfig
from fulltune.data.formats import Example, encode_dataset
from fulltune.data.sources import load_records
from fulltune.errors import UserError
from fulltune.evals.classify import gold_labels
from fulltune.evals.forgetting import ProbeSet


@dataclass(kw_only=True)
class TaskData:
    train: list[Example]
    val: list[Example]
    task: object | None  # datasets.Dataset of records scored for task accuracy
    task_source: str
    stats: dict
    probes: ProbeSet | None = None
    general: list[Example] = field(default_factory=list)  # data.general: mixing and the EWC Fisher
    drift_general: list[Example] = field(default_factory=list)  # general text the drift monitor scores
    replay_prompts: list[list[dict]] = field(default_factory=list)  # data.replay: conversations θ0 answers

    def add_replay(self, cfg: RunConfig, model, tokenizer, *, device, precision: str) -> None:
        """data.replay: θ0's own greedy answers (cached) join the general examples; call with θ0,
        before the sampler is built and before any step (data/replay.py)."""
        if not self.replay_prompts:
            return
        from fulltune.data.replay import replay_examples

        examples, self.stats["replay"] = replay_examples(
            cfg, self.replay_prompts, model, tokenizer, device=device, precision=precision
        )
        self.general += examples
        print(
            f"[data] replay: {len(examples)} sequences of θ0's answers join the general examples "
            f"({self.stats['replay']['target_tokens']:,} loss tokens, answers only)",
            flush=True,
        )


def read_sources(cfg: RunConfig) -> dict[str, tuple[str, object]]:
    """Every data file the run needs, read and checked before the model is loaded (data.replay's
    prompts under "replay")."""
    from fulltune.data.replay import read_prompts

    named = {"train": cfg.data.train, "validation": cfg.data.validation, "task": cfg.eval.task_file}
    named.update({f"general:{i}": spec for i, spec in enumerate(cfg.data.general)})
    sources = {
        role: (path, load_records(path))
        for role, path in ((role, resolve_data_path(spec)) for role, spec in named.items() if spec)
    }
    replay = read_prompts(cfg)
    if replay:
        sources["replay"] = ("data.replay", replay)
    return sources


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
            raise UserError(
                f"{train_path}: data.val_fraction={d.val_fraction} leaves no training sequences ({len(train)} usable)"
            )
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
        print(f"[data] held out {len(val)} of the training sequences for validation", flush=True)
    stats["n_train"], stats["n_val"] = len(train), len(val)
    if d.packing:
        from fulltune.data.packing import fill, pack

        sequences = len(train)
        train = pack(train, d.max_seq_len, cfg.train.seed)
        stats["packing"] = {"sequences": sequences, "rows": len(train), "fill": fill(train, d.max_seq_len)}
        print(
            f"[data] packed {sequences} training sequences into {len(train)} rows of ≤ {d.max_seq_len} tokens "
            f"({100 * stats['packing']['fill']:.1f}% filled)",
            flush=True,
        )
    task_source, task = sources.get("task", ("", None))
    if task is not None:
        gold_labels(task, task_source, list(cfg.eval.labels))  # a bad task file fails before training starts
    general = _general_examples(cfg, tokenizer, sources, stats)
    probes = None
    if cfg.eval.probes:
        probes = ProbeSet(list(cfg.eval.probes), tokenizer, cfg.eval.probe_items, cfg.eval.probe_code_items)
        print(f"[data] probes: {', '.join(f'{p.name} ({len(p.items)})' for p in probes.probes)}", flush=True)
    return TaskData(
        train=train, val=val, task=task, task_source=task_source, stats=stats, probes=probes, general=general,
        drift_general=_drift_general(cfg, tokenizer, general), replay_prompts=sources.get("replay", ("", []))[1],
    )  # fmt: skip


def _drift_general(cfg: RunConfig, tokenizer, general: list[Example]) -> list[Example]:
    """The last `eval.drift_general` passages of data.general, or of LAMBADA without it (every token)."""
    n = cfg.eval.drift_general if cfg.eval.drift else 0
    if n == 0:
        return []
    if general:
        return general[-n:]
    path = resolve_data_path("builtin:lambada")
    ds = load_records(path)
    as_text = replace(cfg.data, format="auto", loss_on="all")
    examples, _ = encode_dataset(ds.select(range(max(0, len(ds) - n), len(ds))), tokenizer, as_text, path)
    return examples


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
