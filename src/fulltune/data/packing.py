"""Packing: several sequences share one row of at most `data.max_seq_len` tokens, each attending
only to itself.

A packed row is an `Example` whose `lengths` lists its sequences. `collate` turns it into
`position_ids` that restart at 0 at every sequence and passes no 2D attention mask: transformers
then finds the boundaries from the position ids (masking_utils.find_packed_sequence_indices) and
builds a block-diagonal causal mask for SDPA / eager attention, and flash-attention's varlen path
reads the same position ids. A 2D mask would silently switch that detection off (transformers
PR #46634): `check_isolation` runs the real model on two sequences, packed and alone, before
training, so an architecture or kernel that does not isolate them is refused, never trained on.

The first token of every sequence carries no loss (nothing in its own sequence predicts it), so
the loss is Σ CE / N over exactly the target tokens the same sequences have unpacked.

Rows are filled best-fit in a seeded order: each sequence goes into the open row it fills most
tightly, so rows mix sequences from all over the data (no grouping by length) and the same seed
gives the same rows.
"""

from __future__ import annotations

import bisect
import contextlib

import torch

from fulltune import distributed as D
from fulltune.data.formats import Example
from fulltune.errors import UserError


def pack(examples: list[Example], max_len: int, seed: int) -> list[Example]:
    """The examples packed into rows of ≤ max_len tokens, every example in exactly one row."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + 17)).tolist()
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the tightest fit is the first with enough room
    for i in order:
        n = len(examples[i].input_ids)
        assert 0 < n <= max_len, f"sequence of {n} tokens in rows of {max_len}"
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = max_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    return [_row([examples[i] for i in members]) for members in rows]


def _row(members: list[Example]) -> Example:
    ids, mask = [], []
    for e in members:
        ids += e.input_ids
        mask += [0] + list(e.target_mask[1:])  # a sequence's first token is predicted by nothing of its own
    return Example(ids, mask, tuple(len(e.input_ids) for e in members))


def position_ids(lengths: tuple[int, ...], width: int) -> list[int]:
    """Positions restarting at every sequence; the padding after the last one is a sequence of its own."""
    out = [p for n in lengths for p in range(n)]
    return out + list(range(width - len(out)))


def as_one_row(model, inputs: dict) -> bool:
    """Whether a micro-batch of packed rows runs as one row of B·L tokens: flash-attention 2 finds packed
    sequences (position ids restarting at 0) only in a batch of one row (transformers'
    `_is_packed_sequence`), and would otherwise run each packed row as one causal sequence. Its varlen
    path costs the same either way; SDPA and eager keep the rows (their block mask grows with B·L)."""
    return (
        getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        and "position_ids" in inputs
        and "attention_mask" not in inputs
        and inputs["input_ids"].shape[0] > 1
    )


def one_row(inputs: dict) -> dict:
    """[B, L] ids and position ids as [1, B·L]: each row's sequences (its padding a sequence of its
    own) one after another, every sequence still starting at position 0."""
    return {k: v.reshape(1, -1) for k, v in inputs.items()}


def fill(rows: list[Example], max_len: int) -> float:
    return sum(len(r.input_ids) for r in rows) / (max_len * len(rows)) if rows else 0.0


@torch.no_grad()
def check_isolation(model, device, vocab: int, autocast=None) -> float:
    """Refuse packing where the model's attention does not keep packed sequences apart: the logits
    of a sequence packed behind another must equal its logits alone, two packed rows to the batch (as
    train.micro_batch_size 2 runs them: flash-attention 2 as one row, `as_one_row`). Run in
    the weights' own dtype (isolation is a property of the mask, not of the precision), or under the
    run's `autocast` where the attention takes bf16 only (flash_attention_2). Returns the largest gap."""
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, vocab, (7,), generator=g), torch.randint(3, vocab, (9,), generator=g)
    packed = torch.cat([first, second])[None].expand(2, -1).to(device)  # the same packed row twice: batch 2
    positions = torch.tensor([position_ids((7, 9), 16)] * 2, device=device)
    was_training = model.training
    model.eval()
    inputs = {"input_ids": packed, "position_ids": positions}
    flat = as_one_row(model, inputs)  # as loss.target_logits runs the training rows
    with autocast() if autocast else contextlib.nullcontext():
        logits = model(**(one_row(inputs) if flat else inputs), use_cache=False).logits
        together = logits.reshape(2, 16, -1)[:, 7:].float()
        alone = model(input_ids=second[None].to(device), use_cache=False).logits.float()
    model.train(was_training)
    gap = float((together - alone).abs().max())
    scale = float(alone.abs().max()) or 1.0
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 and not autocast else 3e-2
    if D.any_rank(not gap <= tolerance * scale):  # NaN fails too; a failure on any rank stops every rank
        attn = getattr(model.config, "_attn_implementation", "?")
        raise UserError(
            f"data.packing: {type(model).__name__} with attention '{attn}' does not keep packed sequences "
            f"apart (a packed sequence's logits moved by {gap:.3g}, {gap / scale:.1%} of their scale, when "
            "another was packed before it); set data.packing=false"
        )
    return gap
