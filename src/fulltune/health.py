"""Step health: a non-finite step never reaches the weights, a diverging run is flagged, and no
checkpoint or export ever holds a non-finite weight.

`train_step` checks the step's loss and gradient norm before the optimiser runs and skips the
update when either is NaN or inf (the batch is consumed and the step counted, as Megatron counts
its skipped iterations). Here the run keeps the tally: `train.max_bad_steps` bad steps in a row
stop the run, its last good checkpoint intact. With `train.optimizer_in_backward` the update
happens during backward, before any check can run, so the first bad step stops the run at once.

A finite run can still diverge. The reference is step 1: θ0's loss and gradient norm on the first
batch, measured before any update. A step whose loss is above LOSS_FACTOR × that loss, or whose
gradient norm is above NORM_FACTOR × that norm, counts as diverging; PATIENCE such steps in a row
warn once while the run goes on, and `results.json` and the final summary say so.
"""

from __future__ import annotations

import math

import torch

from fulltune import distributed as D
from fulltune.errors import UserError

LOSS_FACTOR, NORM_FACTOR, PATIENCE = 3.0, 1e3, 3


def weights_finite(model) -> bool:
    """Every weight finite, on every rank (under FSDP2 each rank checks its shards)."""
    bad = any(not bool(torch.isfinite(D.local(p.detach())).all()) for p in model.parameters())
    return not D.any_rank(bad)


def refuse_nonfinite_weights(model, what) -> None:
    if not weights_finite(model):
        raise UserError(
            f"{what}: not written, the weights hold NaN or inf; the previous checkpoint is kept "
            "(lower optim.lr, set optim.grad_clip, or check the data)"
        )


def check_step(state: dict, loss: float, norm: float, max_bad: int, in_backward: bool, last_good) -> str | None:
    """Tally the step just taken (state["step"] already counts it). Returns a warning line, or None;
    raises once the run must stop. `last_good()`: the latest checkpoint, for that message only."""
    h = state.setdefault(
        "health", {"skipped_steps": 0, "bad_in_a_row": 0, "reference": None, "diverging_in_a_row": 0, "diverged": None}
    )
    step = state["step"]
    if not (math.isfinite(loss) and math.isfinite(norm)):
        h["skipped_steps"] += 1
        h["bad_in_a_row"] += 1
        good = last_good()
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        if in_backward:
            raise UserError(
                f"step {step}: loss {loss}, grad norm {norm}; with train.optimizer_in_backward the update "
                f"was already applied, so the run stops here; {kept}. Lower optim.lr or check the data"
            )
        if h["bad_in_a_row"] >= max_bad:
            raise UserError(
                f"step {step}: {h['bad_in_a_row']} non-finite steps in a row (train.max_bad_steps "
                f"{max_bad}); stopped, {kept}. Lower optim.lr, set optim.grad_clip, or check the data"
            )
        return (
            f"step {step}: loss {loss}, grad norm {norm}: not finite, the update was skipped "
            f"({h['bad_in_a_row']} in a row; the run stops at {max_bad})"
        )
    h["bad_in_a_row"] = 0
    if h["reference"] is None:
        h["reference"] = {"step": step, "loss": loss, "grad_norm": norm}
        return None
    ref = h["reference"]
    high = loss > LOSS_FACTOR * ref["loss"] or norm > NORM_FACTOR * max(ref["grad_norm"], 1e-12)
    h["diverging_in_a_row"] = h["diverging_in_a_row"] + 1 if high else 0
    if h["diverging_in_a_row"] == PATIENCE and h["diverged"] is None:
        h["diverged"] = {"step": step, "loss": loss, "grad_norm": norm, "reference": ref}
        return divergence_line(h["diverged"])
    return None


def divergence_line(d: dict) -> str:
    ref = d["reference"]
    return (
        f"diverging since step {d['step'] - PATIENCE + 1}: loss {d['loss']:.4g} (step {ref['step']}: "
        f"{ref['loss']:.4g}), grad norm {d['grad_norm']:.3g} (step {ref['step']}: {ref['grad_norm']:.3g}); "
        "lower optim.lr or set optim.grad_clip"
    )
