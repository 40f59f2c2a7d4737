"""Everything the training loop touches, built once: `setup(cfg)` → `Run`. The run directory and
resume checks, θ0 (or this rank's FSDP2 shards), the data, the sampler, the optimiser, the anchor,
the memory check and the writers; a checkpoint restored and checked against the config."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fulltune import checkpoint, rundir, tblog
from fulltune import distributed as D
from fulltune.anchors import Anchor, anchor_for_run
from fulltune.config import RunConfig, save_config
from fulltune.data.loader import StepSampler
from fulltune.data.mixture import MixedSampler
from fulltune.data.packing import check_isolation
from fulltune.data.rundata import TaskData, load_task_data, read_sources
from fulltune.errors import UserError
from fulltune.memory.measure import PeakMeter, make_resident
from fulltune.memory.runcheck import warn_if_too_big
from fulltune.memory.runmemory import RunMemory
from fulltune.model import compile_layers, load_theta0
from fulltune.optim.param_groups import build_optimizer
from fulltune.optim.schedules import schedule_fn
from fulltune.runtime import autocast_factory, check_device_settings, pick_device, resolve_precision
from fulltune.throughput import FlopModel, flop_model, run_peak


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
    memory: RunMemory  # the memory check: peak vs estimate, model-state bytes
    flops: FlopModel  # model FLOPs of a step (throughput.py)
    peak_flops: float  # the ranks' measured matmul peak, FLOP/s (0: not measured)
    anchor: Anchor | None = None  # θ0 copy for L2-SP / EWC / decay toward θ0
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
            raise UserError(
                "train.optimizer_in_backward: not combined with FSDP2 (torchrun) in this version; "
                "turn it off or train as one process without torchrun"
            )
        if cfg.optim.name in ("adamw8bit", "adamw4bit"):
            raise UserError(
                f"optim.name: {cfg.optim.name} fails on sharded (DTensor) states in torchao 0.18 on CPU "
                "and is unmeasured on GPUs; under FSDP2 use adamw, adafactor or sgd"
            )
    if D.is_main():
        for line in rundir.clean_interrupted_writes(run_dir):
            print(f"[train] {line}", flush=True)
    D.barrier()  # every rank resolves the same checkpoint
    resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    if cfg.train.resume and resume_from is None:
        rundir.refuse_restart_over_final(run_dir, cfg.train.overwrite)
        print(f"[train] no checkpoint in {run_dir / 'checkpoints'}; starting from θ0", flush=True)
    if cfg.train.memory == "lean":
        chosen = {k: cfg.get(k) for k in cfg.preset_keys}
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
    sampler = StepSampler(
        len(data.train), cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.seed, lengths
    )
    if cfg.data.mix_ratio > 0:
        sizes = [len(e.lengths) or 1 for e in data.train]  # packed rows count as their sequences
        sampler = MixedSampler(sampler, len(data.general), cfg.data.mix_ratio, cfg.train.seed, sizes)
    total = cfg.train.max_steps or math.ceil(sampler.steps_per_epoch * cfg.train.epochs)
    if cfg.schedule.warmup_steps > total:
        print(
            f"[train] warning: schedule.warmup_steps {cfg.schedule.warmup_steps} is longer than the run "
            f"({total} steps): the warmup is cut to {total} and the peak lr is reached only at the last step",
            flush=True,
        )
    optimizer = build_optimizer(model, cfg.optim, precision, cfg.train.optimizer_in_backward)
    autocast = autocast_factory(precision, device, cfg.model.activation_offload)
    meter.pause()  # θ0 evaluation (and EWC's Fisher) run at full speed; step 1 resumes measuring
    anchor = anchor_for_run(
        cfg,
        run_dir,
        model,
        data.general,
        tokenizer.pad_token_id,
        autocast,  # before resume: θ0
        resuming=resume_from is not None,
    )
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
    print(
        f"[train] device {device}{ranks}, precision {precision}, {total} steps "
        f"({sampler.steps_per_epoch} per epoch, batch {cfg.train.micro_batch_size}×{cfg.train.grad_accum_steps}), "
        f"{cfg.optim.name}, "
        + (
            f"step in backward ({len(optimizer.param_groups)} per-parameter optimisers)"
            if cfg.train.optimizer_in_backward
            else f"{len(optimizer.param_groups)} parameter groups"
        ),
        flush=True,
    )
    memory = RunMemory(meter, model, cfg, precision, state, anchor.nbytes if anchor else 0)
    return Run(
        cfg,
        run_dir,
        model,
        tokenizer,
        data,
        optimizer,
        sampler,
        total,
        schedule_fn(cfg.schedule, cfg.optim.lr, total),
        autocast,
        precision,
        device,
        state,
        memory,
        flop_model(model),
        run_peak(cfg, model, precision, device),
        anchor,
        tblog.open_writer(run_dir, state["step"]) if cfg.train.tensorboard and D.is_main() else None,
    )


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
