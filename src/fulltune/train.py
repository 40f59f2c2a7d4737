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
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fulltune import checkpoint, health, report, rundir, tblog
from fulltune import distributed as D
from fulltune.anchors import Anchor, anchor_for_run
from fulltune.atomic import write_failure
from fulltune.config import RunConfig, save_config
from fulltune.data.loader import IGNORE, StepSampler, collate, count_targets
from fulltune.data.mixture import MixedSampler
from fulltune.data.packing import check_isolation
from fulltune.errors import Interrupted, OutOfMemory, UserError
from fulltune.loss import loss_sum
from fulltune.data.rundata import TaskData, load_task_data, read_sources
from fulltune.evals import budget
from fulltune.evals.during_run import finish_probes, headlines, report_task, run_probes, task_accuracy
from fulltune.memory.measure import PeakMeter, make_resident
from fulltune.memory.runcheck import out_of_memory_line, warn_if_too_big
from fulltune.memory.runmemory import RunMemory
from fulltune.model import compile_layers, load_theta0
from fulltune.optim.param_groups import build_optimizer, lrs_by_name
from fulltune.optim.schedules import schedule_fn
from fulltune.optim.in_backward import InBackward
from fulltune.optim.optimizers import set_lr
from fulltune.runtime import autocast_factory, check_device_settings, lean_settings, pick_device, resolve_precision
from fulltune.stop import StopRequest
from fulltune.throughput import FlopModel, flop_model, memory_gb, peak_memory_gb, run_peak, sequence_lengths


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""
    cfg: RunConfig
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    data: TaskData
    optimizer: torch.optim.Optimizer
    sampler: StepSampler
    total_steps: int
    lr_multiplier: object
    autocast: object
    precision: str
    device: torch.device
    state: dict
    memory: RunMemory              # the memory check: peak vs estimate, model-state bytes
    flops: FlopModel               # model FLOPs of a step (throughput.py)
    peak_flops: float              # the ranks' measured matmul peak, FLOP/s (0: not measured)
    anchor: Anchor | None = None   # θ0 copy for L2-SP / EWC / decay toward θ0
    tensorboard: object | None = None  # SummaryWriter on rank 0 with train.tensorboard (tblog.py)

    def examples(self, indices: list[int]) -> list:
        """Task examples, then general ones (index n_task + j) when data mixing is on."""
        n = len(self.data.train)
        return [self.data.train[i] if i < n else self.data.general[i - n] for i in indices]


def setup(cfg: RunConfig) -> Run:
    device = D.init(cfg.train.device) or pick_device(cfg.train.device)  # torchrun: this rank's device
    if not D.is_main():
        cfg.train.progress = False  # one progress bar: rank 0's
    run_dir = rundir.check_run_dir(cfg.train.output_dir, cfg.train.resume, cfg.train.overwrite)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.force_precision)
    check_device_settings(cfg, device)
    if D.sharded():  # what this version does not combine with FSDP2, refused before the model loads
        if cfg.train.optimizer_in_backward:
            raise UserError("train.optimizer_in_backward: not combined with FSDP2 (torchrun) in this version; "
                            "turn it off or train as one process without torchrun")
        if cfg.optim.name in ("adamw8bit", "adamw4bit"):
            raise UserError(f"optim.name: {cfg.optim.name} fails on sharded (DTensor) states in torchao 0.18 on CPU "
                            "and is unmeasured on GPUs; under FSDP2 use adamw, adafactor or sgd")
    if D.is_main():
        for line in rundir.clean_interrupted_writes(run_dir):
            print(f"[train] {line}", flush=True)
    D.barrier()  # every rank resolves the same checkpoint
    resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    if cfg.train.resume and resume_from is None:
        rundir.refuse_restart_over_final(run_dir, cfg.train.overwrite)
        print(f"[train] no checkpoint in {run_dir / 'checkpoints'}; starting from θ0", flush=True)
    if cfg.train.memory == "lean":
        chosen = {k: _get(cfg, k) for k in lean_settings(cfg.to_dict())}
        print("[train] memory lean: " + ", ".join(f"{k}={v}" for k, v in chosen.items()), flush=True)
    sources = read_sources(cfg)  # a missing or malformed file fails before the model loads
    too_big = warn_if_too_big(cfg, precision, device)
    if too_big:
        print(too_big, flush=True)
    meter = PeakMeter(device.type).start()  # baseline before θ0 loads
    try:
        return _build(cfg, run_dir, resume_from, device, precision, sources, meter)
    except BaseException:
        meter.stop()  # never leave glibc in its slow measuring mode behind a failed start
        raise


def _build(cfg: RunConfig, run_dir: Path, resume_from, device, precision: str, sources, meter: PeakMeter) -> Run:
    if D.sharded():
        model, tokenizer = D.load_sharded(cfg.model, precision, device)  # FSDP2: each rank keeps 1/G of every weight
    else:
        model, tokenizer, _ = load_theta0(cfg.model)
        model.to(device, dtype=torch.bfloat16 if precision == "bf16" else None)
        if precision == "bf16":
            print("[model] pure bf16: every weight cast to bfloat16, no fp32 copy kept", flush=True)
        make_resident(model)  # the CPU memory check counts the weights as resident before step 1
    data = load_task_data(cfg, tokenizer, sources)
    if cfg.data.packing:  # eager, before compiling: an attention that mixes packed sequences is refused here
        check_isolation(model, device, model.config.vocab_size)
        D.reshard(model)  # the optimizer below must get the shards, not the root's gathered weights
    if cfg.train.compile:
        compile_layers(model, cfg.train.compile_fallback, device.type)
    lengths = [len(e.input_ids) for e in data.train] if cfg.data.group_by_length else None
    sampler = StepSampler(len(data.train), cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.seed, lengths)
    if cfg.data.mix_ratio > 0:
        sizes = [len(e.lengths) or 1 for e in data.train]  # packed rows count as their sequences
        sampler = MixedSampler(sampler, len(data.general), cfg.data.mix_ratio, cfg.train.seed, sizes)
    total = cfg.train.max_steps or math.ceil(sampler.steps_per_epoch * cfg.train.epochs)
    if cfg.schedule.warmup_steps > total:
        print(f"[train] warning: schedule.warmup_steps {cfg.schedule.warmup_steps} is longer than the run ({total} steps): "
              f"the warmup is cut to {total} and the peak lr is reached only at the last step", flush=True)
    optimizer = build_optimizer(model, cfg.optim, precision, cfg.train.optimizer_in_backward)
    autocast = autocast_factory(precision, device, cfg.model.activation_offload)
    meter.pause()  # θ0 evaluation (and EWC's Fisher) run at full speed; step 1 resumes measuring
    anchor = anchor_for_run(cfg, run_dir, model, data.general, tokenizer.pad_token_id, autocast,  # before resume: θ0
                            resuming=resume_from is not None)
    state = {"step": 0, "tokens_seen": 0, "target_tokens_seen": 0, "elapsed_s": 0.0, "results": {}}
    if resume_from is not None:
        state = _resume(resume_from, run_dir, cfg, model, optimizer, sampler, total, precision)
    state.update(total_steps=total, precision=precision)
    if "memory" in state["results"] or (device.type == "cpu" and cfg.train.memory_steps == 0):
        meter.stop()  # measured before the resume, or not wanted
    if D.is_main():
        rundir.start_run_dir(run_dir, resume_from is None, lambda path: save_config(cfg, path))
    D.barrier()
    ranks = f", FSDP2 over {D.world_size()} rank{'s' if D.world_size() > 1 else ''}" if D.sharded() else ""
    print(f"[train] device {device}{ranks}, precision {precision}, {total} steps "
          f"({sampler.steps_per_epoch} per epoch, batch {cfg.train.micro_batch_size}×{cfg.train.grad_accum_steps}), "
          f"{cfg.optim.name}, " + (f"step in backward ({len(optimizer.param_groups)} per-parameter optimisers)"
                                   if cfg.train.optimizer_in_backward else f"{len(optimizer.param_groups)} parameter groups"),
          flush=True)
    memory = RunMemory(meter, model, cfg, precision, state, anchor.nbytes if anchor else 0)
    return Run(cfg, run_dir, model, tokenizer, data, optimizer, sampler, total,
               schedule_fn(cfg.schedule, cfg.optim.lr, total), autocast, precision, device, state, memory,
               flop_model(model), run_peak(cfg, model, precision, device), anchor,
               tblog.open_writer(run_dir, state["step"]) if cfg.train.tensorboard and D.is_main() else None)


def _get(cfg: RunConfig, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _resume(path: Path, run_dir: Path, cfg: RunConfig, model, optimizer, sampler, total: int, precision: str) -> dict:
    """Restore a checkpoint; refuse settings that would silently change the resumed run."""
    checkpoint.check_compatible(path, cfg)
    state = checkpoint.load_checkpoint(path, model, optimizer)
    checkpoint.check_resumed_run(path, state, cfg, total, precision)
    sampler.load_state_dict(state["sampler"])
    if D.is_main():
        checkpoint.trim_metrics(run_dir / "metrics.jsonl", state["step"])
        checkpoint.drop_later_checkpoints(run_dir, state["step"])  # from an abandoned future of this run
    print(f"[train] resumed from {path} at step {state['step']}", flush=True)
    return state


def train_step(model, optimizer, micro_batches: list[dict], autocast, grad_clip: float,
               anchor: Anchor | None = None, n_targets: int | None = None, memory: RunMemory | None = None
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
        norm = float(D.full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))))
        applied = math.isfinite(total) and math.isfinite(norm)  # a non-finite step never reaches the weights (health.py)
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
    return [_collate_or_null(run, run.examples(idx), first) for idx in D.my_share(indices, run.cfg.train.micro_batch_size)]


def _log(run: Run, record: dict) -> None:
    if not D.is_main():
        return
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    try:
        with open(run.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(finite) + "\n")  # strict JSON: NaN and inf as null
        tblog.write(run.tensorboard, record)
    except OSError as exc:
        raise UserError(write_failure(exc, run.run_dir / "metrics.jsonl", 1 << 20) or
                        f"{run.run_dir / 'metrics.jsonl'}: cannot write ({exc})") from None


def _save(run: Run) -> Path:
    run.state["sampler"] = run.sampler.state_dict()
    return checkpoint.save_checkpoint(run.run_dir, run.state["step"], run.model, run.optimizer,
                                      run.state, run.cfg.train.keep_checkpoints)


def loop(run: Run, stop: StopRequest) -> None:
    """Every optimiser step, top to bottom: rates, micro-batches, update, then the step's bookkeeping."""
    cfg = run.cfg.train
    bar = tqdm(total=run.total_steps, initial=run.state["step"], desc="train", disable=not cfg.progress,
               dynamic_ncols=True)
    while run.state["step"] < run.total_steps:
        for group in run.optimizer.param_groups:
            set_lr(group, group["initial_lr"] * run.lr_multiplier(run.state["step"]))
        indices = run.sampler.next_step()  # the whole step's sequences, over every rank
        batches = _my_batches(run, indices)
        flat = [i for idx in indices for i in idx]
        t0 = time.perf_counter()
        with run.memory.step(batches):
            loss, norm = train_step(run.model, run.optimizer, batches, run.autocast, run.cfg.optim.grad_clip,
                                    run.anchor, _targets(run.examples(flat)), run.memory)
        dt = time.perf_counter() - t0
        (padded,) = D.all_sum([sum(b["input_ids"].numel() for b in batches)])  # null micro-batches count too
        rec = _record(run, flat, loss, norm, dt, padded)
        warning = health.check_step(run.state, loss, norm, cfg.max_bad_steps, cfg.optimizer_in_backward,
                                    lambda: (checkpoint.list_checkpoints(run.run_dir) or [None])[-1])
        if warning:
            tqdm.write(f"[train] warning: {warning}")
        saved = _after_step(run, rec, bar)
        if D.any_rank(stop.requested) and run.state["step"] < run.total_steps:  # every rank stops together
            bar.close()
            path = saved or _save(run)
            raise Interrupted(f"stopped at step {run.state['step']}; checkpoint {path}; "
                              "continue with train.resume=auto", stop.exit_code)
    bar.close()


def _targets(examples: list) -> int:
    return sum(sum(e.target_mask[1:]) for e in examples)


def _record(run: Run, flat: list[int], loss: float, norm: float, dt: float, padded: float) -> dict:
    """Advance the counters by the step just taken (`flat`: its sequences, `padded`: the token positions
    its micro-batches computed over every rank); its metrics.jsonl record, throughput included."""
    s, every = run.state, run.examples(flat)
    tokens, targets = sum(len(e.input_ids) for e in every), _targets(every)
    s["step"], s["tokens_seen"], s["target_tokens_seen"] = s["step"] + 1, s["tokens_seen"] + tokens, s["target_tokens_seen"] + targets
    s["elapsed_s"] += dt
    rec = {"step": s["step"], "epoch": run.sampler.epoch, "loss": loss, "lr": lrs_by_name(run.optimizer),
           "grad_norm": norm, "tokens_seen": s["tokens_seen"], "target_tokens_seen": s["target_tokens_seen"],
           "tokens_per_s": tokens / dt, "elapsed_s": s["elapsed_s"]}
    flops = run.flops.step_flops(sequence_lengths(every), targets)
    rec.update(padding_fraction=1 - tokens / padded, flops_per_s=flops / dt, memory_gb=memory_gb(run.device),
               peak_memory_gb=peak_memory_gb(run.device))
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
    shown = dict(loss=f"{rec['loss']:.4f}", lr=f"{top_lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                 pad=f"{100 * rec['padding_fraction']:.0f}%", mem=f"{rec['memory_gb']:.1f}/{rec['peak_memory_gb']:.1f}G")
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
        results["mixing"] = {"task_sequences": run.sampler.task_seen, "general_sequences": run.sampler.general_seen,
                             "general_share": run.sampler.general_seen / max(1, run.sampler.task_seen + run.sampler.general_seen),
                             "general_target_token_share": st.get("general_target_tokens", 0) / max(1, st["target_tokens_seen"])}
        print(f"[data] mixing: {run.sampler.general_seen} general sequences of "
              f"{run.sampler.task_seen + run.sampler.general_seen} ({100 * results['mixing']['general_share']:.1f}%), "
              f"{100 * results['mixing']['general_target_token_share']:.1f}% of the loss tokens", flush=True)
    h = run.state.get("health", {})
    results.update(skipped_steps=h.get("skipped_steps", 0), diverged=h.get("diverged"))
    if results["diverged"]:
        print(f"[train] warning: this run diverged: {health.divergence_line(results['diverged'])}", flush=True)
    results.update(steps=run.state["step"], tokens_seen=run.state["tokens_seen"],
                   target_tokens_seen=run.state["target_tokens_seen"], train_time_s=run.state["elapsed_s"],
                   data=run.data.stats)
    if run.tensorboard is not None:
        run.tensorboard.close()
    if D.is_main():
        (run.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        rundir.finish_run_dir(run.run_dir)
    return results


def run_training(cfg: RunConfig) -> Run:
    """setup → task accuracy of θ0 → loop → checkpoint → export, task accuracy of θ*, results.json.
    SIGINT / SIGTERM (stop.py): at once outside the steps; during them, after the step and a checkpoint."""
    with StopRequest() as stop:
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
            raise OutOfMemory(out_of_memory_line(run.model, cfg, run.precision, run.device, run.state["step"] + 1,
                                                 (checkpoint.list_checkpoints(run.run_dir) or [None])[-1])) from None
        run.memory.close()
        saved = _save(run)  # the trained weights, before the final evaluation
        stop.defer = False
        if D.any_rank(stop.requested):
            raise Interrupted(f"stopped after the last step ({run.state['step']}); checkpoint {saved}; "
                              "continue with train.resume=auto", stop.exit_code)
        finish(run)
    print(f"[train] done: {run.state['step']} steps in {time.perf_counter() - started:.0f} s → {run.run_dir}", flush=True)
    if D.is_main():
        report.at_end_of_run(run.run_dir, run.state["results"], run.cfg.train.report)
    return run
