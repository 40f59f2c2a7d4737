"""Task accuracy for a fixed label set: the label the model finds most likely is its answer.

Each record's last answer (assistant message or completion) is the gold label; we replace it by
each candidate label, score the candidate's tokens (with the end-of-turn marker the format adds)
by summed log-likelihood, and take the argmax. No sampling, no parsing of generated text.
"""

from __future__ import annotations

import math
import weakref

import torch
from tqdm import tqdm

from fulltune import distributed as D
from fulltune.data.conversions import convert
from fulltune.data.formats import Example, detect_format, encode_record
from fulltune.data.sources import row_location
from fulltune.errors import UserError
from fulltune.evals.prefix_tree import collate_tree, groups, tree_attention, tree_row
from fulltune.evals.probes import choice_outcomes
from fulltune.loss import target_logprobs


def _with_answer(record: dict, fmt: str, answer: str) -> dict:
    if fmt == "messages":
        msgs = [dict(m) for m in record["messages"]]
        msgs[-1]["content"] = answer
        return {"messages": msgs}
    return {"prompt": record["prompt"], "completion": answer}


def _gold(record: dict, fmt: str, where: str) -> str:
    if fmt == "messages":
        last = record["messages"][-1]
        if last.get("role") != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's answer (the gold label)")
        if not isinstance(last.get("content"), str):
            raise UserError(f"{where}: the assistant's answer must be a string")
        return last["content"]
    return record["completion"]


@torch.no_grad()
def score_sequences(model, examples, *, pad_id: int, batch_size: int, autocast, desc: str = "") -> list[float]:
    """Summed target log-likelihood of each example. Consecutive examples with the same context (a
    record's label candidates, an item's choices) share one row (evals/prefix_tree.py); rows are
    batched by length, `batch_size` rows at a time."""
    if not examples:
        return []
    device = D.local(next(model.parameters())).device
    mask = tree_attention(model)
    rows = [tree_row(examples, g) for g in groups(examples, share=mask != "2d")]
    if len(rows) < len(examples) and not tree_is_exact(model, mask, max(len(r.input_ids) for r in rows)):
        mask, rows = "2d", [tree_row(examples, [i]) for i in range(len(examples))]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    # Under FSDP2 rank r scores batches r, r+G, ...; a rank with one batch fewer runs a forward it
    # discards (every rank joins every gather). The batches themselves are those of one process.
    g, r = D.world_size(), D.rank()
    mine = batches[r::g] + [[]] * (-(-len(batches) // g) - len(batches[r::g]))
    sums = torch.zeros(len(examples), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for idx in tqdm(mine, desc=desc, leave=False, disable=not desc):
        batch = collate_tree([rows[i] for i in idx or order[:1]], pad_id, device, mask)
        with autocast():
            logp, _ = target_logprobs(model, batch)
        if idx:
            sums.index_add_(0, batch["example"].cpu(), logp.double().cpu())
    model.train(was_training)
    scores = sums.tolist()
    if g > 1:  # each example was scored on one rank, 0 elsewhere
        scores = [sum(part[i] for part in D.gather(scores)) for i in range(len(examples))]
    return scores


@torch.no_grad()
def tree_is_exact(model, mask: str, longest: int) -> bool:
    """Does this model's attention honour a prefix tree of rows up to `longest` tokens? Not where a
    sliding window is shorter (the custom mask replaces the model's own). Otherwise two continuations
    of one context are scored in a tree and each alone, in the weights' own dtype (a property of the
    mask, not of the precision), once per model: an attention that ignores the mask lets the second
    branch see the first."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < longest:
        return False
    if model in _TREE_CHECKED:
        return _TREE_CHECKED[model]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ctx, a, b = (torch.randint(3, vocab, (n,), generator=g).tolist() for n in (6, 3, 4))
    pair = [Example(ctx + a, [0] * 6 + [1] * 3), Example(ctx + b, [0] * 6 + [1] * 4)]
    device = D.local(next(model.parameters())).device
    was_training = model.training
    model.eval()
    tree = target_logprobs(model, collate_tree([tree_row(pair, [0, 1])], 0, device, mask))[0]
    alone = torch.cat([target_logprobs(model, collate_tree([tree_row(pair, [i])], 0, device, "2d"))[0] for i in (0, 1)])
    model.train(was_training)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    exact = bool(((tree - alone).abs() <= tolerance * (1 + alone.abs())).all())
    exact = not D.any_rank(not exact)  # every rank scores the same way, or their forwards would not pair up
    if not exact:
        print(
            f"[eval] {type(model).__name__}'s attention does not honour a prefix-tree mask: scoring each "
            "candidate on its own (slower, same scores)",
            flush=True,
        )
    _TREE_CHECKED[model] = exact
    return exact


_TREE_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gold_labels(ds, source: str, labels: list[str]) -> tuple[str, list[int]]:
    """(format, index of each record's gold label); checked before training so a bad file fails early."""
    fmt = detect_format(list(ds.column_names), "auto", source)
    ds, fmt = convert(ds, fmt, source)  # ShareGPT, Alpaca: the gold is the last answer either way
    if fmt == "text":
        raise UserError(f"{source}: task accuracy needs messages or prompt+completion records")
    golds = []
    for index, record in enumerate(ds):
        try:
            gold = _gold(record, fmt, "")
            if gold not in labels:
                raise UserError(f": answer {gold!r} is not one of eval.labels {labels}")
        except UserError as exc:
            raise UserError(f"{row_location(source, index)}{exc}") from None
        golds.append(labels.index(gold))
    return fmt, golds


def label_accuracy(
    model, tokenizer, ds, *, source: str, labels: list[str], batch_size: int, autocast, desc: str = ""
) -> dict:
    """{"accuracy", "correct", "n", "stderr"} over the records of `ds`."""
    _, golds = gold_labels(ds, source, labels)
    ds, fmt = convert(
        ds, detect_format(list(ds.column_names), "auto", source), source, chat=tokenizer.chat_template is not None
    )
    candidates = []
    for index, record in enumerate(ds):
        for label in labels:
            candidates.append(
                encode_record(
                    tokenizer,
                    _with_answer(record, fmt, label),
                    fmt,
                    loss_on="completion",
                    where=f"{source} (record {index})",
                )
            )
    scores = score_sequences(
        model, candidates, pad_id=tokenizer.pad_token_id, batch_size=batch_size, autocast=autocast, desc=desc
    )
    k = len(labels)
    lengths = [sum(c.target_mask) for c in candidates]
    items = choice_outcomes([k] * len(golds), golds, scores, lengths)
    correct = sum(items["correct"])
    acc = correct / len(golds)
    return {
        "accuracy": acc,
        "correct": correct,
        "n": len(golds),
        "stderr": math.sqrt(acc * (1 - acc) / len(golds)),
        "items": items,
    }
