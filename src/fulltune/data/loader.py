"""Which examples form each optimiser step, and how a micro-batch becomes tensors.

The sampler is a seeded permutation per epoch plus a position: its state is two integers, so a
resumed run continues exactly where it stopped without replaying batches it has seen.
"""

from __future__ import annotations

import math

import torch

from fulltune.data.formats import Example
from fulltune.errors import UserError

IGNORE = -100


class StepSampler:
    """Yields, per optimiser step, `grad_accum` micro-batches of example indices.

    A step never crosses an epoch boundary; the last step of an epoch may be smaller.
    """

    def __init__(self, n_examples: int, micro_batch: int, grad_accum: int, seed: int):
        assert n_examples > 0 and micro_batch > 0 and grad_accum > 0
        self.n, self.micro_batch, self.grad_accum, self.seed = n_examples, micro_batch, grad_accum, seed
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / (self.micro_batch * self.grad_accum))

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), self.epoch
        return self._perm

    def next_step(self) -> list[list[int]]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        chunk = self._permutation()[self.pos: self.pos + self.micro_batch * self.grad_accum]
        self.pos += len(chunk)
        return [chunk[i: i + self.micro_batch] for i in range(0, len(chunk), self.micro_batch)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("n", "seed", "micro_batch", "grad_accum") if state[k] != mine[k]]
        if changed:
            raise UserError("cannot resume: the data order changed since the checkpoint ("
                            + ", ".join(f"{k} {state[k]} → {mine[k]}" for k in changed) + ")")
        self.epoch, self.pos = state["epoch"], state["pos"]


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-padded tensors. Padding is masked by length, never by token id (pad may equal EOS)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        mask = torch.tensor(e.target_mask, dtype=torch.bool)
        labels[row, :n] = torch.where(mask, ids[row, :n], IGNORE)
    labels[:, 0] = IGNORE  # nothing predicts the first token
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def count_targets(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())
