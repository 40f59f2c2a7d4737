"""The trainer state and the run's results, typed.

`TrainerState` is what a checkpoint's trainer_state.json holds: the counters the loop advances, the
sampler's position, the health tally, the forgetting budget's progress, the heaviest micro-batch
the memory check has seen, and `Results`, which becomes RUN/results.json when the run ends.
`state_dict()` writes the same JSON keys the untyped dict had, and `from_dict()` reads checkpoints
written before these types existed (tests/test_resume_old.py). Keys this version does not know are
carried through unchanged (`extra`), so an older fulltune never loses what a newer one wrote.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepResult:
    """What one optimiser step did (train.train_step)."""

    loss: float  # mean token cross-entropy over the step's target tokens, every rank (whatever loss.type)
    grad_norm: float  # global gradient norm before clipping
    applied: bool  # the update reached the weights: finite, or taken inside backward before any check
    dft_loss: float | None = None  # loss.type dft: the mean token −sg(p)·log p that was minimised
    kl: float | None = None  # loss.kl_to_theta0 > 0: the mean KL(p_θ0 ‖ p_θ) per target token

    @property
    def finite(self) -> bool:
        parts = (self.loss, self.grad_norm, self.kl if self.kl is not None else 0.0)
        return all(math.isfinite(x) for x in parts)


@dataclass
class Health:
    """Non-finite and diverging steps (health.py): the tally a resumed run continues."""

    skipped_steps: int = 0
    bad_in_a_row: int = 0
    reference: dict | None = None  # step 1's {"step", "loss", "grad_norm"}: what divergence is measured against
    diverging_in_a_row: int = 0
    diverged: dict | None = None  # the step that made the run count as diverged, with its reference


@dataclass
class BudgetTrack:
    """The forgetting budget's progress (evals/budget.py): every probed step checked, the best inside."""

    checked: list[dict] = field(default_factory=list)
    best: dict | None = None


@dataclass
class Results:
    """RUN/results.json. A field left None is not written (the run did not measure it), except
    `diverged`, which a finished run always states."""

    task_accuracy_theta0: dict | None = None
    probes_theta0: dict | None = None
    detectable: dict | None = None  # per probe, what its size can detect (evals/theta0.py)
    state_memory: dict | None = None  # measured vs predicted bytes of parameters, gradients, optimiser state
    memory: dict | None = None  # measured vs predicted peak of the heaviest micro-batch
    final_val_loss: float | None = None
    drift: dict | None = None  # θ*'s KL(θ0 ‖ θ*) per token: kl_task, kl_general (evals/drift.py)
    task_accuracy_final: dict | None = None
    probes_final: dict | None = None
    forgetting: dict | None = None
    budget: dict | None = None
    mixing: dict | None = None
    skipped_steps: int | None = None
    diverged: dict | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    target_tokens_seen: int | None = None
    train_time_s: float | None = None
    data: dict | None = None
    extra: dict = field(default_factory=dict)  # keys written by another version (or `fulltune interpolate`)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or (f.name == "diverged" and self.steps is not None)):
                out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> Results:
        return cls(**_known(cls, raw), extra=_unknown(cls, raw))


@dataclass
class TrainerState:
    """Everything about a run's progress that a checkpoint must restore (beside weights, optimiser, RNG)."""

    step: int = 0
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    elapsed_s: float = 0.0  # seconds inside the optimiser steps
    results: Results = field(default_factory=Results)
    total_steps: int | None = None  # the run's length when the checkpoint was written (None: older checkpoints)
    precision: str | None = None  # what train.precision resolved to
    largest_micro_batch: dict = field(default_factory=lambda: {"rows": 0, "length": 0, "targets": 0})
    general_target_tokens: int | None = None  # loss tokens from data.general (data mixing only)
    health: Health = field(default_factory=Health)
    budget: BudgetTrack | None = None
    sampler: dict | None = None  # the sampler's own state_dict(), taken when the checkpoint is written
    extra: dict = field(default_factory=dict)

    def advance(self, tokens: int, targets: int, seconds: float) -> None:
        """Count the step just taken."""
        self.step += 1
        self.tokens_seen += tokens
        self.target_tokens_seen += targets
        self.elapsed_s += seconds

    def state_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in ("general_target_tokens", "budget", "sampler")):
                continue
            out[f.name] = value.to_dict() if isinstance(value, Results) else _plain(value)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> TrainerState:
        known = _known(cls, raw)
        known["results"] = Results.from_dict(raw.get("results") or {})
        known["health"] = Health(**_known(Health, raw.get("health") or {}))
        if raw.get("budget") is not None:
            known["budget"] = BudgetTrack(**_known(BudgetTrack, raw["budget"]))
        return cls(**known, extra=_unknown(cls, raw))


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _known(cls: type, raw: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in raw.items() if k in names}


def _unknown(cls: type, raw: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k not in names}
