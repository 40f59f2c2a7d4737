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
    With `lengths` (data.group_by_length), each epoch's permutation is grouped: pools of POOL_STEPS
    steps' sequences are sorted by length and cut into micro-batches, whose order within the pool is
    shuffled again, so a micro-batch holds similar lengths (little padding) and the order stays seeded.
    """

    POOL_STEPS = 16

    def __init__(
        self, n_examples: int, micro_batch: int, grad_accum: int, seed: int, *, lengths: list[int] | None = None
    ):
        assert n_examples > 0 and micro_batch > 0 and grad_accum > 0
        assert lengths is None or len(lengths) == n_examples
        self.n, self.micro_batch, self.grad_accum, self.seed = n_examples, micro_batch, grad_accum, seed
        self.lengths = lengths
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / (self.micro_batch * self.grad_accum))

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perm, self._perm_epoch = (self._grouped(perm, g) if self.lengths else perm), self.epoch
        return self._perm

    def _grouped(self, perm: list[int], g: torch.Generator) -> list[int]:
        pool = self.micro_batch * self.grad_accum * self.POOL_STEPS
        out: list[int] = []
        for start in range(0, len(perm), pool):
            members = sorted(perm[start : start + pool], key=lambda i: -self.lengths[i])
            batches = [members[i : i + self.micro_batch] for i in range(0, len(members), self.micro_batch)]
            out += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
        return out

    def next_step(self) -> list[list[int]]:
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        chunk = self._permutation()[self.pos : self.pos + self.micro_batch * self.grad_accum]
        self.pos += len(chunk)
        return [chunk[i : i + self.micro_batch] for i in range(0, len(chunk), self.micro_batch)]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "n": self.n,
            "seed": self.seed,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "grouped": self.lengths is not None,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        state = {"grouped": False, **state}  # checkpoints from before group_by_length
        changed = [k for k in ("n", "seed", "micro_batch", "grad_accum", "grouped") if state[k] != mine[k]]
        if changed:
            raise UserError(
                "cannot resume: the data order changed since the checkpoint ("
                + ", ".join(f"{k} {state[k]} → {mine[k]}" for k in changed)
                + ")"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-padded tensors. Padding is masked by length, never by token id (pad may equal EOS).

    With a packed row among them (data/packing.py): position ids that restart at every sequence and
    no 2D attention mask, so the model isolates the sequences; padding is then a sequence of its own,
    after every real token (causal: nothing real attends to it), and carries no loss."""
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
    if any(e.lengths for e in examples):
        from fulltune.data.packing import position_ids

        positions = torch.tensor([position_ids(e.lengths or (len(e.input_ids),), longest) for e in examples])
        return {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": labels.to(device)}
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def count_targets(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


def collate_or_null(examples: list[Example], fallback: Example, pad_id: int, device: torch.device | str) -> dict:
    """collate(examples); with none, a null micro-batch (`fallback` with no target tokens): under FSDP2
    every rank joins every forward's gathers, and this one adds nothing to the loss or the gradients."""
    batch = collate(examples or [fallback], pad_id, device)
    if not examples:
        batch["labels"].fill_(IGNORE)
    return batch
