"""The training loop: one readable loop, θ0 → θ*, every weight trainable.

    for each optimiser step:
        set every group's lr = initial_lr · lr_multiplier(step)       (stateless schedule)
        take grad_accum micro-batches; N = their target tokens in total
        backward(Σ token CE / N) per micro-batch                       (== one big batch)
        clip the global grad norm; optimizer.step(); zero grads
          (train.optimizer_in_backward: each parameter was updated inside backward instead)
        log; validate; checkpoint

The memory check (memory/runmemory.py) is told of the step at two named points: `memory.step`
around it and `memory.update_applied` between the update and freeing the gradients.

Under torchrun the same loop runs on every rank with the model sharded by FSDP2 (distributed.py):
each rank takes its share of the step's micro-batches; losses and counts are summed over ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fulltune import checkpoint, health, report, rundir, tblog
from fulltune import distributed as D
from fulltune.anchors import Anchor
from fulltune.atomic import write_failure
from fulltune.config import RunConfig
from fulltune.data.loader import IGNORE, collate, count_targets
from fulltune.data.mixture import MixedSampler
from fulltune.errors import Interrupted, OutOfMemory, UserError
from fulltune.evals import budget
from fulltune.evals.during_run import finish_probes, headlines, report_task, run_probes, task_accuracy
from fulltune.loss import loss_sum
from fulltune.memory.measure import malloc_restored
from fulltune.memory.runcheck import out_of_memory_line
from fulltune.memory.runmemory import RunMemory
from fulltune.optim.in_backward import InBackward
from fulltune.optim.optimizers import set_lr
from fulltune.optim.param_groups import lrs_by_name
from fulltune.run_setup import Run, setup
from fulltune.stop import StopRequest
from fulltune.throughput import memory_gb, peak_memory_gb, sequence_lengths


def train_step(
    model,
    optimizer,
    micro_batches: list[dict],
    autocast,
    grad_clip: float,
    anchor: Anchor | None = None,
    n_targets: int | None = None,
    memory: RunMemory | None = None,
) -> tuple[float, float]:
    """One optimiser step over micro-batches; returns (mean token loss, grad norm before clipping).

    `n_targets`: the step's target tokens over every rank (default: counted here and summed). FSDP
    averages gradients over the G ranks, so each rank's loss is scaled by G: Σ CE / N in the end.
    With an anchor: its penalty's gradient joins the loss's before clipping, and decay toward θ0
    is applied just before the optimiser's update (decoupled, as AdamW's own decay).
    `memory`: the run's memory check, told when the update is applied (gradients still alive).
    """
    n_targets = n_targets or int(D.all_sum([sum(count_targets(b) for b in micro_batches)])[0])
    scale = D.world_size()
    total = 0.0
    for batch in micro_batches:
        with autocast():
            s = loss_sum(model, batch)
        (s * scale / n_targets).backward()  # × 1 is exact: one process computes s / N as before
        total += s.item()
    (total,) = D.all_sum([total])  # the step's loss, the same on every rank
    if isinstance(optimizer, InBackward):  # every parameter was updated, and its gradient freed, in backward
        norm, applied = float(optimizer.take_grad_norm()), True
    else:
        if anchor is not None:
            anchor.last_penalty = anchor.add_penalty_grad()
        norm = float(
            D.full_value(
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
            )
        )
        applied = math.isfinite(total) and math.isfinite(
            norm
        )  # a non-finite step never reaches the weights (health.py)
        if applied:
            if anchor is not None:
                anchor.decay_toward_theta0(optimizer)
            optimizer.step()
    if applied and memory is not None:
        memory.update_applied(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return total / n_targets, norm


@torch.no_grad()
def validation_loss(run: Run) -> float:
    examples = run.data.val
    was_training = run.model.training
    run.model.eval()
    total, n = 0.0, 0
    bs = run.cfg.train.micro_batch_size
    chunks = [list(range(start, min(start + bs, len(examples)))) for start in range(0, len(examples), bs)]
    for idx in D.my_share(chunks, bs):  # every chunk when there is one rank
        batch = _collate_or_null(run, [examples[i] for i in idx], examples[0])
        with run.autocast():
            total += float(loss_sum(run.model, batch))
        n += count_targets(batch)
    run.model.train(was_training)
    total, n = D.all_sum([total, n])
    return total / n


def _collate_or_null(run: Run, examples: list, fallback) -> dict:
    """collate(examples); with none, a null micro-batch (`fallback` with no target tokens): under FSDP2
    every rank joins every forward's gathers, and this one adds nothing to the loss or the gradients."""
    batch = collate(examples or [fallback], run.tokenizer.pad_token_id, run.device)
    if not examples:
        batch["labels"].fill_(IGNORE)
    return batch


def _my_batches(run: Run, indices: list[list[int]]) -> list[dict]:
    """This rank's micro-batches of the step (all of them on one device)."""
    first = run.examples(indices[0][:1])[0]
    return [
        _collate_or_null(run, run.examples(idx), first) for idx in D.my_share(indices, run.cfg.train.micro_batch_size)
    ]


def _log(run: Run, record: dict) -> None:
    if not D.is_main():
        return
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    try:
        with open(run.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(finite) + "\n")  # strict JSON: NaN and inf as null
        tblog.write(run.tensorboard, record)
    except OSError as exc:
        raise UserError(
            write_failure(exc, run.run_dir / "metrics.jsonl", 1 << 20)
            or f"{run.run_dir / 'metrics.jsonl'}: cannot write ({exc})"
        ) from None


def _save(run: Run) -> Path:
    run.state["sampler"] = run.sampler.state_dict()
    return checkpoint.save_checkpoint(
        run.run_dir, run.state["step"], run.model, run.optimizer, run.state, run.cfg.train.keep_checkpoints
    )


def loop(run: Run, stop: StopRequest) -> None:
    """Every optimiser step, top to bottom: rates, micro-batches, update, then the step's bookkeeping."""
    cfg = run.cfg.train
    bar = tqdm(
        total=run.total_steps, initial=run.state["step"], desc="train", disable=not cfg.progress, dynamic_ncols=True
    )
    while run.state["step"] < run.total_steps:
        for group in run.optimizer.param_groups:
            set_lr(group, group["initial_lr"] * run.lr_multiplier(run.state["step"]))
        indices = run.sampler.next_step()  # the whole step's sequences, over every rank
        batches = _my_batches(run, indices)
        flat = [i for idx in indices for i in idx]
        t0 = time.perf_counter()
        with run.memory.step(batches):
            loss, norm = train_step(
                run.model,
                run.optimizer,
                batches,
                run.autocast,
                run.cfg.optim.grad_clip,
                run.anchor,
                _targets(run.examples(flat)),
                run.memory,
            )
        dt = time.perf_counter() - t0
        (padded,) = D.all_sum([sum(b["input_ids"].numel() for b in batches)])  # null micro-batches count too
        rec = _record(run, flat, loss, norm, dt, padded)
        warning = health.check_step(
            run.state,
            loss,
            norm,
            cfg.max_bad_steps,
            cfg.optimizer_in_backward,
            lambda: (checkpoint.list_checkpoints(run.run_dir) or [None])[-1],
        )
        if warning:
            tqdm.write(f"[train] warning: {warning}")
        saved = _after_step(run, rec, bar)
        if D.any_rank(stop.requested) and run.state["step"] < run.total_steps:  # every rank stops together
            bar.close()
            path = saved or _save(run)
            raise Interrupted(
                f"stopped at step {run.state['step']}; checkpoint {path}; continue with train.resume=auto",
                stop.exit_code,
            )
    bar.close()


def _targets(examples: list) -> int:
    return sum(sum(e.target_mask[1:]) for e in examples)


def _record(run: Run, flat: list[int], loss: float, norm: float, dt: float, padded: float) -> dict:
    """Advance the counters by the step just taken (`flat`: its sequences, `padded`: the token positions
    its micro-batches computed over every rank); its metrics.jsonl record, throughput included."""
    s, every = run.state, run.examples(flat)
    tokens, targets = sum(len(e.input_ids) for e in every), _targets(every)
    s["step"], s["tokens_seen"], s["target_tokens_seen"] = (
        s["step"] + 1,
        s["tokens_seen"] + tokens,
        s["target_tokens_seen"] + targets,
    )
    s["elapsed_s"] += dt
    rec = {
        "step": s["step"],
        "epoch": run.sampler.epoch,
        "loss": loss,
        "lr": lrs_by_name(run.optimizer),
        "grad_norm": norm,
        "tokens_seen": s["tokens_seen"],
        "target_tokens_seen": s["target_tokens_seen"],
        "tokens_per_s": tokens / dt,
        "elapsed_s": s["elapsed_s"],
    }
    flops = run.flops.step_flops(sequence_lengths(every), targets)
    rec.update(
        padding_fraction=1 - tokens / padded,
        flops_per_s=flops / dt,
        memory_gb=memory_gb(run.device),
        peak_memory_gb=peak_memory_gb(run.device),
    )
    if run.peak_flops:
        rec["mfu"] = flops / dt / run.peak_flops
    if isinstance(run.sampler, MixedSampler):
        general = run.examples([i for i in flat if i >= len(run.data.train)])
        s["general_target_tokens"] = s.get("general_target_tokens", 0) + _targets(general)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        rec["skipped"] = True  # the update was not applied
    if run.anchor is not None:
        rec["theta0_distance"] = run.anchor.distance()  # after the update
        if run.anchor.lam:
            rec["penalty"] = run.anchor.last_penalty
    return rec


def _after_step(run: Run, rec: dict, bar) -> Path | None:
    """The step's bookkeeping: validation, probes, metrics line, progress bar, periodic checkpoint."""
    cfg = run.cfg.train
    step = rec["step"]
    if cfg.val_interval and step % cfg.val_interval == 0 and step < run.total_steps and run.data.val:
        rec["val_loss"] = validation_loss(run)
    interval = run.cfg.eval.probe_interval
    if interval and step % interval == 0 and step < run.total_steps and run.data.probes is not None:
        rec["probes"] = headlines(run_probes(run, f"step {step}"))
        if run.cfg.eval.forgetting_budget:
            rec["budget"] = budget.check_step(run, step, rec["probes"], checkpoint.export_hf)
    if step == 1 and cfg.compile:
        print(f"[train] step 1 took {rec['elapsed_s']:.1f} s, torch.compile's warm-up included", flush=True)
    if step % cfg.log_interval == 0 or "val_loss" in rec or "probes" in rec or step == run.total_steps:
        _log(run, rec)
    top_lr = max(rec["lr"].values())
    shown = dict(
        loss=f"{rec['loss']:.4f}",
        lr=f"{top_lr:.2e}",
        tok_s=f"{rec['tokens_per_s']:.0f}",
        pad=f"{100 * rec['padding_fraction']:.0f}%",
        mem=f"{rec['memory_gb']:.1f}/{rec['peak_memory_gb']:.1f}G",
    )
    if "mfu" in rec:
        shown["mfu"] = f"{100 * rec['mfu']:.0f}%"
    bar.set_postfix(shown, refresh=False)
    bar.update(1)
    if cfg.save_interval and step % cfg.save_interval == 0 and step < run.total_steps:
        return _save(run)
    return None


def finish(run: Run) -> dict:
    results = run.state["results"]
    if run.data.val:
        results["final_val_loss"] = validation_loss(run)
        _log(run, {"step": run.state["step"], "val_loss": results["final_val_loss"]})
        print(f"[train] validation loss {results['final_val_loss']:.4f}", flush=True)
    final = checkpoint.export_hf(run.model, run.tokenizer, run.run_dir / "final")
    print(f"[train] saved the fine-tuned model to {final}", flush=True)
    if run.data.task is not None:
        results["task_accuracy_final"] = task_accuracy(run, "θ*")
        report_task(results)
    if run.data.probes is not None:
        finish_probes(run, results, _log)
        budget.finish(run, results)
    if isinstance(run.sampler, MixedSampler):
        st = run.state
        results["mixing"] = {
            "task_sequences": run.sampler.task_seen,
            "general_sequences": run.sampler.general_seen,
            "general_share": run.sampler.general_seen / max(1, run.sampler.task_seen + run.sampler.general_seen),
            "general_target_token_share": st.get("general_target_tokens", 0) / max(1, st["target_tokens_seen"]),
        }
        print(
            f"[data] mixing: {run.sampler.general_seen} general sequences of "
            f"{run.sampler.task_seen + run.sampler.general_seen} ({100 * results['mixing']['general_share']:.1f}%), "
            f"{100 * results['mixing']['general_target_token_share']:.1f}% of the loss tokens",
            flush=True,
        )
    h = run.state.get("health", {})
    results.update(skipped_steps=h.get("skipped_steps", 0), diverged=h.get("diverged"))
    if results["diverged"]:
        print(f"[train] warning: this run diverged: {health.divergence_line(results['diverged'])}", flush=True)
    results.update(
        steps=run.state["step"],
        tokens_seen=run.state["tokens_seen"],
        target_tokens_seen=run.state["target_tokens_seen"],
        train_time_s=run.state["elapsed_s"],
        data=run.data.stats,
    )
    if run.tensorboard is not None:
        run.tensorboard.close()
    if D.is_main():
        (run.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        rundir.finish_run_dir(run.run_dir)
    return results


def run_training(cfg: RunConfig) -> Run:
    """setup → task accuracy of θ0 → loop → checkpoint → export, task accuracy of θ*, results.json.
    SIGINT / SIGTERM (stop.py): at once outside the steps; during them, after the step and a checkpoint."""
    with StopRequest() as stop, malloc_restored():  # glibc's settings as the caller had them, afterwards
        run = setup(cfg)
        if run.state["step"] == 0:
            if run.data.task is not None:
                run.state["results"]["task_accuracy_theta0"] = task_accuracy(run, "θ0")
            if run.data.probes is not None:
                run.state["results"]["probes_theta0"] = run_probes(run, "θ0")
                _log(run, {"step": 0, "probes": headlines(run.state["results"]["probes_theta0"])})
        started = time.perf_counter()
        stop.defer = True  # from here a signal lets the step finish, then checkpoints
        try:
            loop(run, stop)
        except (torch.OutOfMemoryError, MemoryError):
            raise OutOfMemory(
                out_of_memory_line(
                    run.model,
                    cfg,
                    run.precision,
                    run.device,
                    run.state["step"] + 1,
                    (checkpoint.list_checkpoints(run.run_dir) or [None])[-1],
                )
            ) from None
        run.memory.close()
        saved = _save(run)  # the trained weights, before the final evaluation
        stop.defer = False
        if D.any_rank(stop.requested):
            raise Interrupted(
                f"stopped after the last step ({run.state['step']}); checkpoint {saved}; "
                "continue with train.resume=auto",
                stop.exit_code,
            )
        finish(run)
    print(
        f"[train] done: {run.state['step']} steps in {time.perf_counter() - started:.0f} s → {run.run_dir}", flush=True
    )
    if D.is_main():
        report.at_end_of_run(run.run_dir, run.state["results"], run.cfg.train.report)
    return run
