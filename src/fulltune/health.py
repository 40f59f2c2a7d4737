"""Step health: a non-finite step never reaches the weights, and a diverging run is flagged (no
checkpoint or export ever holds a non-finite weight either: checkpoint.refuse_nonfinite_weights).

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

from fulltune.checkpoint import list_checkpoints
from fulltune.errors import UserError
from fulltune.state import StepResult

LOSS_FACTOR, NORM_FACTOR, PATIENCE = 3.0, 1e3, 3


def check_step(run, result: StepResult) -> str | None:
    """Tally the step just taken (`run`: run_setup.Run, its state already counts the step). Returns a
    warning line, or None; raises once the run must stop (train.max_bad_steps non-finite steps in a
    row, or one with the step in backward)."""
    health, step, cfg = run.state.health, run.state.step, run.cfg.train
    if not result.finite:
        health.skipped_steps += 1
        health.bad_in_a_row += 1
        good = (list_checkpoints(run.run_dir) or [None])[-1]
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        what = f"step {step}: loss {result.loss}, grad norm {result.grad_norm}"
        if cfg.optimizer_in_backward:
            raise UserError(
                f"{what}; with train.optimizer_in_backward the update was already applied, so the run stops here; "
                f"{kept}. Lower optim.lr or check the data"
            )
        if health.bad_in_a_row >= cfg.max_bad_steps:
            raise UserError(
                f"step {step}: {health.bad_in_a_row} non-finite steps in a row (train.max_bad_steps "
                f"{cfg.max_bad_steps}); stopped, {kept}. Lower optim.lr, set optim.grad_clip, or check the data"
            )
        return (
            f"{what}: not finite, the update was skipped "
            f"({health.bad_in_a_row} in a row; the run stops at {cfg.max_bad_steps})"
        )
    health.bad_in_a_row = 0
    if health.reference is None:
        health.reference = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm}
        return None
    ref = health.reference
    high = result.loss > LOSS_FACTOR * ref["loss"] or result.grad_norm > NORM_FACTOR * max(ref["grad_norm"], 1e-12)
    health.diverging_in_a_row = health.diverging_in_a_row + 1 if high else 0
    if health.diverging_in_a_row == PATIENCE and health.diverged is None:
        health.diverged = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "reference": ref}
        return divergence_line(health.diverged)
    return None


def divergence_line(d: dict) -> str:
    ref = d["reference"]
    return (
        f"diverging since step {d['step'] - PATIENCE + 1}: loss {d['loss']:.4g} (step {ref['step']}: "
        f"{ref['loss']:.4g}), grad norm {d['grad_norm']:.3g} (step {ref['step']}: {ref['grad_norm']:.3g}); "
        "lower optim.lr or set optim.grad_clip"
    )
