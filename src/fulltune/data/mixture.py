"""Data mixing: general sequences added to every task step so they make up `ratio` of all sequences.

The task order is exactly the task-only sampler's (mix_ratio 0 ≡ task only). After step k, with
T task sequences seen in all, the general sequences seen are G = round(T · ratio / (1 − ratio)),
so G / (T + G) → ratio with an error below one sequence over the whole run. General sequences
come from their own seeded permutation, epoch after epoch. The state is a handful of integers:
a resumed run draws exactly the sequences the uninterrupted run would have drawn.
"""

from __future__ import annotations

from fulltune.data.loader import StepSampler
from fulltune.errors import UserError


class MixedSampler:
    """Per optimiser step, micro-batches of indices into task examples followed by general ones.

    General example j has index `n_task + j`, so one list `task + general` serves both.
    """

    def __init__(self, task: StepSampler, n_general: int, ratio: float, seed: int, *, sizes: list[int] | None = None):
        """`sizes`: sequences in each task example (packed rows hold several; default one each), so the
        ratio is always one of sequences."""
        assert 0 < ratio < 1 and n_general > 0
        self.task, self.ratio, self.n_task = task, ratio, task.n
        self.sizes = sizes
        self.general = StepSampler(n_general, 1, 1, seed + 7919)  # its own order, independent of the task's
        self.task_seen, self.general_seen = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.task.epoch

    def next_step(self) -> list[list[int]]:
        task_batches = self.task.next_step()
        self.task_seen += sum(self.sizes[i] if self.sizes else 1 for b in task_batches for i in b)
        due = round(self.task_seen * self.ratio / (1 - self.ratio)) - self.general_seen
        general = [self.n_task + self.general.next_step()[0][0] for _ in range(due)]
        self.general_seen += due
        flat = [i for b in task_batches for i in b] + general
        # As few micro-batches as the micro-batch size allows, split evenly (never above it).
        n_micro = max(len(task_batches), -(-len(flat) // self.task.micro_batch))
        size, extra = divmod(len(flat), n_micro)
        out, start = [], 0
        for m in range(n_micro):
            end = start + size + (m < extra)
            out.append(flat[start:end])
            start = end
        return out

    def state_dict(self) -> dict:
        return {
            "task": self.task.state_dict(),
            "general": self.general.state_dict(),
            "ratio": self.ratio,
            "task_seen": self.task_seen,
            "general_seen": self.general_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        if "general" not in state:
            raise UserError("cannot resume: the checkpoint was trained without data mixing (data.mix_ratio 0)")
        if state["ratio"] != self.ratio:
            raise UserError(f"cannot resume: data.mix_ratio changed ({state['ratio']} → {self.ratio})")
        self.task.load_state_dict(state["task"])
        self.general.load_state_dict(state["general"])
        self.task_seen, self.general_seen = state["task_seen"], state["general_seen"]


def mixing_summary(sampler, general_target_tokens: int, target_tokens_seen: int) -> dict | None:
    """results.mixing (printed): how much of the run was general data, in sequences and loss tokens."""
    if not isinstance(sampler, MixedSampler):
        return None
    seen = sampler.task_seen + sampler.general_seen
    out = {
        "task_sequences": sampler.task_seen,
        "general_sequences": sampler.general_seen,
        "general_share": sampler.general_seen / max(1, seen),
        "general_target_token_share": general_target_tokens / max(1, target_tokens_seen),
    }
    print(
        f"[data] mixing: {sampler.general_seen} general sequences of {seen} ({100 * out['general_share']:.1f}%), "
        f"{100 * out['general_target_token_share']:.1f}% of the loss tokens",
        flush=True,
    )
    return out
