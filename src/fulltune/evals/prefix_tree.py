"""Score the candidates that share a context once: one row per context, every candidate a branch.

Task accuracy scores each record with every label, and a multiple-choice probe scores each item
with every choice: k sequences that differ only after a long shared context (the SST-2 prompt is
~79 tokens, its labels 3). Scoring them one by one computes the context k times. Here a group of
consecutive examples whose context tokens are identical becomes one row,

    context · branch 1 · branch 2 · … · branch k

with position ids that continue from the context in every branch and a 4D attention mask in which
each token sees the context and the earlier tokens of its own branch only: the same keys, at the
same positions, as the sequence alone. The first token of each branch is predicted by the
context's last position, so targets are scored at explicit (row, position) pairs
(`loss.target_logprobs` with `score_at`), several of them at that one position.

The context of an example is everything before its first target token (at least its first
token, which nothing predicts). Attention that ignores a custom 4D mask (flash-attention's varlen
kernel; a sliding window shorter than the row) cannot take a tree: `tree_attention` says which
mask a kernel takes, and `classify.tree_is_exact` compares one group scored both ways on the real
model before a tree is trusted (exact in fp32 to ~1e-6, tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fulltune.data.formats import Example


@dataclass
class TreeRow:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)  # 0: the shared context, j: the j-th candidate
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (example, predicting position, token)


def context_length(e: Example) -> int:
    """Tokens before the first target (at least 1: nothing predicts a sequence's first token)."""
    return next((i for i, m in enumerate(e.target_mask) if m and i > 0), len(e.input_ids))


def groups(examples: list[Example], share: bool = True) -> list[list[int]]:
    """Runs of consecutive examples with identical context tokens (each example alone if not `share`)."""
    out: list[list[int]] = []
    last = None
    for i, e in enumerate(examples):
        ctx = tuple(e.input_ids[: context_length(e)])
        if share and out and ctx == last:
            out[-1].append(i)
        else:
            out.append([i])
        last = ctx
    return out


def tree_row(examples: list[Example], members: list[int]) -> TreeRow:
    c = context_length(examples[members[0]])
    first = examples[members[0]].input_ids[:c]
    row = TreeRow(list(first), list(range(c)), [0] * c)
    for j, i in enumerate(members, start=1):
        e = examples[i]
        assert e.input_ids[:c] == first, "a group's members share their context tokens"
        start = len(row.input_ids)
        for t, (token, target) in enumerate(zip(e.input_ids[c:], e.target_mask[c:])):
            if target:
                row.targets.append((i, c - 1 if t == 0 else start + t - 1, token))
        row.input_ids += e.input_ids[c:]
        row.positions += range(c, len(e.input_ids))
        row.branch += [j] * (len(e.input_ids) - c)
    return row


def tree_attention(model) -> str:
    """The mask a model's attention kernel takes for tree rows: "bool" (SDPA), "additive" (eager), or
    "2d" (one sequence per row with a padding mask: flash-attention and any other kernel)."""
    return {"sdpa": "bool", "eager": "additive"}.get(getattr(model.config, "_attn_implementation", None), "2d")


def collate_tree(rows: list[TreeRow], pad_id: int, device, mask: str) -> dict:
    """Right-padded rows with the tree mask (a 2D padding mask when every row is one sequence) and
    `score_at` = (rows, positions, tokens) of every target, plus `example` (whose target each is)."""
    longest = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    positions = torch.arange(longest).repeat(len(rows), 1)
    branch = torch.full((len(rows), longest), -1, dtype=torch.long)  # padding: a branch of its own
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n], positions[b, :n], branch[b, :n] = (
            torch.tensor(r.input_ids),
            torch.tensor(r.positions),
            torch.tensor(r.branch),
        )
    batch = {"input_ids": ids, "position_ids": positions}
    if mask == "2d" or all(max(r.branch) <= 1 for r in rows):  # no tree in this batch: the plain padding mask
        assert all(max(r.branch) <= 1 for r in rows), "tree rows need a 4D mask"
        batch["attention_mask"] = (branch >= 0).long()
    else:
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        sees = causal & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
        batch["attention_mask"] = (
            sees[:, None]
            if mask == "bool"
            else torch.zeros(sees.shape, dtype=torch.float32).masked_fill_(~sees, torch.finfo(torch.float32).min)[
                :, None
            ]
        )
    t = [(b, pos, tok, ex) for b, r in enumerate(rows) for ex, pos, tok in r.targets]
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["score_at"] = tuple(torch.tensor([x[k] for x in t], dtype=torch.long, device=device) for k in range(3))
    batch["example"] = torch.tensor([x[3] for x in t], dtype=torch.long, device=device)
    return batch
