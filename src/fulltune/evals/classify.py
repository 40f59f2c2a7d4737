"""Task accuracy for a fixed label set: the label the model finds most likely is its answer.

Each record's last answer (assistant message or completion) is the gold label; we replace it by
each candidate label, score the candidate's tokens (with the end-of-turn marker the format adds)
by summed log-likelihood, and take the argmax. No sampling, no parsing of generated text.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from fulltune import distributed as D
from fulltune.data.formats import detect_format, encode_record
from fulltune.data.loader import collate
from fulltune.data.sources import row_location
from fulltune.errors import UserError
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
def score_sequences(model, examples, pad_id: int, batch_size: int, autocast, desc: str = "") -> list[float]:
    """Summed target log-likelihood of each example, batched by length."""
    device = D.local(next(model.parameters())).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    # Under FSDP2 rank r scores batches r, r+G, ...; a rank with one batch fewer runs a forward it
    # discards (every rank joins every gather). The batches themselves are those of one process.
    g, r = D.world_size(), D.rank()
    mine = batches[r::g] + [[]] * (-(-len(batches) // g) - len(batches[r::g]))
    scores: dict[int, float] = {}
    was_training = model.training
    model.eval()
    for idx in tqdm(mine, desc=desc, leave=False, disable=not desc):
        batch = collate([examples[i] for i in idx or order[:1]], pad_id, device)
        with autocast():
            logp, rows = target_logprobs(model, batch)
        sums = torch.zeros(len(idx or [0]), dtype=torch.float64, device=logp.device).index_add_(0, rows, logp.double())
        for j, i in enumerate(idx):
            scores[i] = float(sums[j])
    model.train(was_training)
    for part in D.gather(scores) if g > 1 else []:
        scores.update(part)
    return [scores[i] for i in range(len(examples))]


def gold_labels(ds, source: str, labels: list[str]) -> tuple[str, list[int]]:
    """(format, index of each record's gold label); checked before training so a bad file fails early."""
    fmt = detect_format(list(ds.column_names), "auto", source)
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


def label_accuracy(model, tokenizer, ds, source: str, labels: list[str], batch_size: int, autocast,
                   desc: str = "") -> dict:
    """{"accuracy", "correct", "n", "stderr"} over the records of `ds`."""
    fmt, golds = gold_labels(ds, source, labels)
    candidates = []
    for index, record in enumerate(ds):
        for label in labels:
            candidates.append(encode_record(tokenizer, _with_answer(record, fmt, label), fmt, "completion",
                                            f"{source} (record {index})"))
    scores = score_sequences(model, candidates, tokenizer.pad_token_id, batch_size, autocast, desc)
    k = len(labels)
    preds = [max(range(k), key=lambda j: scores[i * k + j]) for i in range(len(golds))]
    correct = sum(int(p == g) for p, g in zip(preds, golds))
    acc = correct / len(golds)
    return {"accuracy": acc, "correct": correct, "n": len(golds),
            "stderr": math.sqrt(acc * (1 - acc) / len(golds))}
