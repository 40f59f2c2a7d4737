"""The training loop: one readable loop, θ0 → θ*, every weight trainable.

    for each optimiser step:
        set every group's lr = initial_lr · lr_multiplier(step)       (stateless schedule)
        take grad_accum micro-batches; N = their target tokens in total
        backward(Σ token loss / N) per micro-batch                     (== one big batch)
          (the loss: CE, or DFT, + β·KL to θ0 where set: loss.Objective)
        clip the global grad norm; optimizer.step(); zero grads
          (train.optimizer_in_backward: each parameter was updated inside backward instead)
        count the step; health; validate, probe, log, checkpoint when each is due

`run_setup.setup` builds everything the loop touches (`Run`); the components say when they act
(`run.evaluator`, `run.metrics`, `run.checkpointer`), and the trainer state (`run.state`, state.py) is
what a checkpoint restores. The memory check (memory/runmemory.py) is told of the step at two named
points: `memory.step` around it and `memory.update_applied` between the update and freeing the
gradients.

Under torchrun the same loop runs on every rank with the model sharded by FSDP2 (distributed.py):
each rank takes its share of the step's micro-batches; losses and counts are summed over ranks.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import torch

from fulltune import checkpoint, health, modelcard, report, rundir, throughput
from fulltune import distributed as D
from fulltune.data.loader import collate_or_null, count_targets
from fulltune.data.mixture import mixing_summary
from fulltune.errors import Interrupted, OutOfMemory
from fulltune.evals import during_run
from fulltune.loss import Objective
from fulltune.memory.measure import malloc_restored
from fulltune.metrics import Progress
from fulltune.optim.in_backward import InBackward
from fulltune.optim.optimizers import set_lr
from fulltune.run_setup import Run, setup
from fulltune.runtime import pick_device, tf32_matmuls
from fulltune.state import StepResult
from fulltune.stop import StopRequest

if TYPE_CHECKING:  # annotations only
    from fulltune.anchors import Anchor
    from fulltune.memory.runmemory import RunMemory


def train_step(
    model,
    optimizer,
    micro_batches: list[dict],
    autocast,
    *,
    grad_clip: float,
    anchor: Anchor | None = None,
    n_targets: int | None = None,
    memory: RunMemory | None = None,
    objective: Objective | None = None,
) -> StepResult:
    """One optimiser step over micro-batches: forward, backward, clip, update (only if finite).

    `n_targets`: the step's target tokens over every rank (default: counted here and summed). FSDP
    averages gradients over the G ranks, so each rank's loss is scaled by G: Σ loss / N in the end.
    With an anchor: its penalty's gradient joins the loss's before clipping, and decay toward θ0
    is applied just before the optimiser's update (decoupled, as AdamW's own decay).
    `memory`: the run's memory check, told when the update is applied (gradients still alive).
    `objective`: the loss (loss.py; default token CE); the result's loss is the mean token CE always."""
    n_targets = n_targets or int(D.all_sum([sum(count_targets(b) for b in micro_batches)])[0])
    assert not isinstance(optimizer, InBackward) or optimizer.clip == grad_clip, (
        "the step in backward clips by optim.grad_clip"
    )
    if isinstance(optimizer, InBackward) and optimizer.clip > 0:  # the norm first, then the clipped updates
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with optimizer.measuring(), torch.random.fork_rng(devices=devices):  # the same dropout masks twice
            _backward(model, micro_batches, autocast, objective=objective or Objective(), n_targets=n_targets)
    loss, parts = _backward(model, micro_batches, autocast, objective=objective or Objective(), n_targets=n_targets)
    if isinstance(optimizer, InBackward):  # every parameter was updated, and its gradient freed, in backward
        result = StepResult(loss, float(optimizer.take_grad_norm()), applied=True, **parts)
    else:
        if anchor is not None:
            anchor.add_penalty_grad()
        clip = grad_clip if grad_clip > 0 else float("inf")
        norm = float(D.full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        result = StepResult(loss, norm, applied=False, **parts)
        result.applied = result.finite  # a non-finite step never reaches the weights (health.py)
        if result.applied:
            if anchor is not None:
                anchor.decay_toward_theta0(optimizer)
            optimizer.step()
    if result.applied and memory is not None:
        memory.update_applied(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return result


def _backward(model, micro_batches: list[dict], autocast, *, objective: Objective, n_targets: int) -> tuple:
    """Backpropagate each micro-batch's objective / N. Returns the step's mean token CE over every rank
    (the same on each) and StepResult's other parts: the mean DFT term and KL per target token, if on."""
    parts = []  # each micro-batch's (Σ CE, Σ DFT, Σ KL), read once after the last (one host sync a step)
    for batch in micro_batches:
        with autocast():
            s = objective.sums(model, batch)
        (s.objective * D.world_size() / n_targets).backward()  # × 1 is exact: one process computes s / N as before
        parts += [s.ce, s.dft, s.kl]
    values = torch.stack(parts).tolist() if parts else []  # summed in Python's float64, as before
    ce, dft, kl = D.all_sum([sum(values[0::3]), sum(values[1::3]), sum(values[2::3])])
    parts = {
        "dft_loss": dft / n_targets if objective.type == "dft" else None,
        "kl": kl / n_targets if objective.kl_beta > 0 else None,
    }
    return ce / n_targets, parts


def _next_step(run: Run) -> tuple[list[int], list[dict]]:
    """Set the step's learning rates and draw its sequences: all of them (every rank's), and this
    rank's micro-batches."""
    for group in run.optimizer.param_groups:
        set_lr(group, group["initial_lr"] * run.lr_multiplier(run.state.step))
    indices = run.sampler.next_step()  # the whole step's sequences, over every rank
    first, pad = run.examples(indices[0][:1])[0], run.tokenizer.pad_token_id
    mine = D.my_share(indices, run.cfg.train.micro_batch_size)
    return [i for idx in indices for i in idx], [collate_or_null(run.examples(i), first, pad, run.device) for i in mine]


def loop(run: Run, stop: StopRequest) -> None:
    """Every optimiser step, top to bottom: the update, then each component that acts on this step."""
    state, cfg = run.state, run.cfg.train
    progress = Progress(run.total_steps, state.step, run.progress)
    while state.step < run.total_steps:
        flat, batches = _next_step(run)
        every = run.examples(flat)
        n_targets = throughput.targets(every)  # N: the step's loss tokens over every rank
        t0 = time.perf_counter()
        with run.memory.step(batches):
            result = train_step(
                run.model, run.optimizer, batches, run.autocast, grad_clip=run.cfg.optim.grad_clip,
                anchor=run.anchor, n_targets=n_targets, memory=run.memory, objective=run.objective,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
        state.advance(tokens=sum(len(e.input_ids) for e in every), targets=n_targets, seconds=seconds)
        rec = throughput.step_record(run, result, flat=flat, batches=batches, seconds=seconds)  # metrics.jsonl's
        warning = health.check_step(run, result)  # the tally of bad and diverging steps; may stop the run
        if warning:
            progress.note(f"[train] warning: {warning}")
        if state.step == 1 and cfg.compile:
            progress.note(f"[train] step 1 took {rec['elapsed_s']:.1f} s, torch.compile's warm-up included")
        if run.evaluator.validation_due(state.step):
            rec.update(during_run.validate(run))  # val_loss; kl_task, kl_general (the drift from θ0)
        if run.evaluator.probes_due(state.step):
            rec.update(during_run.probe_step(run, state.step))
        run.metrics.log_step(rec, last=state.step == run.total_steps)
        progress.show(rec)
        saved = run.checkpointer.save(run) if run.checkpointer.due(state.step) else None
        if D.any_rank(stop.requested) and state.step < run.total_steps:  # every rank stops together
            progress.close()
            path = saved or run.checkpointer.save(run)
            raise Interrupted(
                f"stopped at step {state.step}; checkpoint {path}; continue with train.resume=auto", stop.exit_code
            )
    progress.close()


VALIDATION_NAMES = {"val_loss": "validation loss", "kl_task": "KL(θ0‖θ) on task answers",
                    "kl_general": "KL(θ0‖θ) on general text"}  # fmt: skip


def finish(run: Run) -> None:
    """After the last step: validation loss, final/, θ*'s scores and the forgetting report, results.json."""
    results, state = run.state.results, run.state
    last = during_run.validate(run)
    if last:
        results.final_val_loss = last.get("val_loss")
        results.drift = {k: v for k, v in last.items() if k.startswith("kl_")} or None
        run.metrics.append({"step": state.step, **last})
        print("[train] " + ", ".join(f"{VALIDATION_NAMES[k]} {v:.4f}" for k, v in last.items()), flush=True)
    final = checkpoint.export_hf(run.model, run.tokenizer, run.run_dir / "final")
    print(f"[train] saved the fine-tuned model to {final}", flush=True)
    during_run.after_training(run)
    results.mixing = mixing_summary(run.sampler, state.general_target_tokens or 0, state.target_tokens_seen)
    results.skipped_steps, results.diverged = state.health.skipped_steps, state.health.diverged
    if results.diverged:
        print(f"[train] warning: this run diverged: {health.divergence_line(results.diverged)}", flush=True)
    results.steps, results.tokens_seen, results.target_tokens_seen = (
        state.step,
        state.tokens_seen,
        state.target_tokens_seen,
    )
    results.train_time_s, results.data = state.elapsed_s, run.data.stats
    if D.is_main():
        (run.run_dir / "results.json").write_text(json.dumps(results.to_dict(), indent=1))
        modelcard.attach_run_cards(run.run_dir, results.to_dict(), modelcard.hardware(run.device, run.precision))
        rundir.finish_run_dir(run.run_dir)


def run_training(cfg) -> Run:
    """setup → task accuracy of θ0 → loop → checkpoint → export, task accuracy of θ*, results.json.
    SIGINT / SIGTERM (stop.py): at once outside the steps; during them, after the step and a checkpoint.
    glibc's settings, the run directory's lock and CUDA's TF32 switch are the caller's again afterwards.
    The trackers' runs (train.loggers) end FINISHED with the results, or KILLED / FAILED."""
    device = pick_device(cfg.train.device)
    with StopRequest() as stop, malloc_restored(), rundir.held(), tf32_matmuls(cfg.train.tf32, device):  # undone after
        run = setup(cfg)
        try:
            started = time.perf_counter()
            _train(run, stop)
        except BaseException as exc:
            run.metrics.end(None, "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED")
            raise
    print(f"[train] done: {run.state.step} steps in {time.perf_counter() - started:.0f} s → {run.run_dir}", flush=True)
    if D.is_main():
        report.at_end_of_run(run.run_dir, run.state.results.to_dict(), run.cfg.train.report)
    run.metrics.end(run.state.results.to_dict())
    return run


def _train(run: Run, stop: StopRequest) -> None:
    """θ0's evaluation, the steps, the last checkpoint, then `finish`."""
    if run.state.step == 0:
        during_run.before_training(run)
    stop.defer = True  # from here a signal lets the step finish, then checkpoints
    try:
        loop(run, stop)
    except (torch.OutOfMemoryError, MemoryError):
        last = (checkpoint.list_checkpoints(run.run_dir) or [None])[-1]
        raise OutOfMemory(run.memory.out_of_memory_line(run.device, step=run.state.step + 1, checkpoint=last)) from None
    run.memory.close()
    saved = run.checkpointer.save(run)  # the trained weights, before the final evaluation
    stop.defer = False
    if D.any_rank(stop.requested):
        raise Interrupted(
            f"stopped after the last step ({run.state.step}); checkpoint {saved}; continue with train.resume=auto",
            stop.exit_code,
        )
    finish(run)
