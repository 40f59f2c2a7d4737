"""Everything the training loop touches, built once: `setup(cfg)` → `Run`. The run directory and
resume checks, θ0 (or this rank's FSDP2 shards), the data, the sampler, the optimiser, the anchor,
the loss (and its frozen θ0 for a KL term), the memory check and the writers; a checkpoint restored
and checked against the config."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fulltune import checkpoint, kl_reference, rundir
from fulltune import distributed as D
from fulltune.anchors import Anchor, anchor_for_run
from fulltune.checkpoint import Checkpointer
from fulltune.config import RunConfig
from fulltune.config_checks import check_run_length, check_run_time
from fulltune.data.loader import StepSampler
from fulltune.data.mixture import MixedSampler
from fulltune.data.packing import check_isolation
from fulltune.data.rundata import TaskData, load_task_data, read_sources
from fulltune.errors import UserError
from fulltune.evals import drift, lmeval, records
from fulltune.evals.during_run import Evaluator
from fulltune.loss import Objective, objective_for_run
from fulltune.memory.measure import PeakMeter, make_resident
from fulltune.memory.runcheck import warn_if_too_big
from fulltune.memory.runmemory import RunMemory
from fulltune.metrics import MetricsLog
from fulltune.model import cast_weights, compile_layers, load_theta0
from fulltune.modelcheck import check_model_path
from fulltune.optim.optimizers import weights_loaded
from fulltune.optim.param_groups import build_optimizer
from fulltune.optim.schedules import schedule_fn
from fulltune.runtime import autocast_factory, check_device_settings, pick_device, resolve_precision
from fulltune.state import TrainerState
from fulltune.throughput import FlopModel, flop_model, run_peak
from fulltune.trackers import check_installed, open_trackers, trackers_of


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
    lr_multiplier: object  # step -> multiplier of each group's initial lr (optim/schedules.py)
    autocast: object  # () -> the forward's precision context (runtime.py)
    precision: str
    device: torch.device
    state: TrainerState  # what a checkpoint restores: counters, sampler, health, results (state.py)
    memory: RunMemory  # the memory check: peak vs estimate, model-state bytes
    metrics: MetricsLog  # RUN/metrics.jsonl and its TensorBoard mirror
    checkpointer: Checkpointer  # when and where checkpoints are written
    evaluator: Evaluator  # when the run validates and probes
    flops: FlopModel  # model FLOPs of a step (throughput.py)
    peak_flops: float  # the ranks' measured matmul peak, FLOP/s (0: not measured)
    progress: bool  # progress bars: train.progress, on rank 0 only
    anchor: Anchor | None = None  # θ0 copy for L2-SP / EWC / decay toward θ0
    objective: Objective = field(default_factory=Objective)  # the loss: CE or DFT, + β·KL to a frozen θ0
    drift: dict = field(default_factory=dict)  # θ0's references for KL(θ0 ‖ θ) at validation (evals/drift.py)

    def examples(self, indices: list[int]) -> list:
        """Task examples, then general ones (index n_task + j) when data mixing is on."""
        n = len(self.data.train)
        return [self.data.train[i] if i < n else self.data.general[i - n] for i in indices]


def setup(cfg: RunConfig) -> Run:
    device = D.init(cfg.train.device) or pick_device(cfg.train.device)  # torchrun: this rank's device
    rundir.check_output_path(cfg.train.output_dir)  # a file in the way: said at once
    check_model_path(cfg.model.path, cfg.model.trust_remote_code)  # θ0's files, before anything is written
    run_dir = rundir.claim_run_dir(cfg.train.output_dir, cfg.train.resume, cfg.train.overwrite, lock=D.is_main())
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision, device, cfg.train.force_precision)
    check_device_settings(cfg, device)
    check_installed(trackers_of(cfg.train))  # a tracker's missing package, before any model loads
    if any(str(p).startswith("lmeval:") for p in cfg.eval.probes):
        lmeval.check_installed()
    if D.sharded():
        _refuse_under_fsdp2(cfg)
    if D.is_main():
        for line in rundir.clean_interrupted_writes(run_dir):
            print(f"[train] {line}", flush=True)
    D.barrier()  # every rank resolves the same checkpoint
    resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    if cfg.train.resume and resume_from is None:
        rundir.refuse_restart_over_final(run_dir, cfg.train.overwrite)
        print(f"[train] no checkpoint in {run_dir / 'checkpoints'}; starting from θ0", flush=True)
    if cfg.train.memory != "default":
        chosen = {k: cfg.get(k) for k in cfg.preset_keys}
        print(f"[train] memory {cfg.train.memory}: " + ", ".join(f"{k}={v}" for k, v in chosen.items()), flush=True)
    sources = read_sources(cfg)  # a missing or malformed file fails before the model loads
    check_run_length(cfg, len(sources["train"][1]))  # ~1e9 epochs: a typo, asked about first
    too_big = warn_if_too_big(cfg, precision, device)
    if too_big:
        print(too_big, flush=True)
    meter = PeakMeter(device.type).start()  # baseline before θ0 loads
    try:
        return _build(
            cfg, run_dir, resume_from=resume_from, device=device, precision=precision, sources=sources, meter=meter
        )
    except BaseException:
        meter.stop()  # never leave glibc in its slow measuring mode behind a failed start
        raise


def _refuse_under_fsdp2(cfg: RunConfig) -> None:
    """What this version does not combine with FSDP2, refused before the model loads."""
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
    if any(str(p).startswith("lmeval:") for p in cfg.eval.probes):
        raise UserError(
            "eval.probes: an lmeval: probe runs lm-evaluation-harness on one process's whole model; under FSDP2 "
            "(torchrun) name the built-in probe instead (arc_easy, piqa, sciq: the same items, scored by fulltune)"
        )
    if cfg.optim.cpu_offload:
        raise UserError(
            "optim.cpu_offload: torchao's CPU offload is for one GPU (it pins a copy of each whole weight); "
            "under FSDP2 (torchrun) the shards already spread the optimiser state: turn it off"
        )
    if cfg.optim.name == "adam_mini":
        raise UserError(
            "optim.name: adam_mini's package finds the other ranks by counting GPUs and gathers its blocks "
            "itself; this version does not run it under FSDP2 (torchrun): use adamw, or train as one process"
        )
    if cfg.optim.name in ("galore", "apollo", "apollo_mini"):
        raise UserError(
            f"optim.name: {cfg.optim.name} projects each whole matrix's gradient, and under FSDP2 (torchrun) a "
            "rank holds a shard; this version does not gather them: use adamw, or train as one process"
        )
    if cfg.optim.name == "muon":
        raise UserError(
            "optim.name: muon orthogonalises each whole matrix, and under FSDP2 (torchrun) a rank holds a "
            "shard; this version does not gather them: use adamw, adafactor or sgd, or train as one process"
        )
    if cfg.loss.kl_to_theta0 > 0:
        raise UserError(
            "loss.kl_to_theta0: its frozen θ0 copy is not sharded with FSDP2 (torchrun), and its cached "
            "reference is untested there, in this version; set it to 0 or train as one process without torchrun"
        )


def _build(cfg: RunConfig, run_dir: Path, *, resume_from, device, precision: str, sources, meter: PeakMeter) -> Run:
    model, tokenizer = _load_model(cfg, precision, device)
    objective = objective_for_run(cfg.loss, model)  # θ0 copied before any compile, resume or update
    data = load_task_data(cfg, tokenizer, sources)
    data.add_replay(cfg, model, tokenizer, device=device, precision=precision)  # θ0 answers data.replay (cached)
    if cfg.data.packing:  # eager, before compiling: an attention that mixes packed sequences is refused here
        flash = cfg.model.attn_implementation == "flash_attention_2"  # bf16 inputs only: under the run's autocast
        check_isolation(model, device, model.config.vocab_size, autocast_factory(precision, device) if flash else None)
        D.reshard(model)  # the optimizer below must get the shards, not the root's gathered weights
    if cfg.train.compile:
        compile_layers(model, cfg.train.compile_fallback, device.type)
    sampler = _sampler(cfg, data)
    total = _total_steps(cfg, sampler)
    optimizer = build_optimizer(model, cfg.optim, precision, cfg.train.optimizer_in_backward)
    autocast = autocast_factory(precision, device, cfg.model.activation_offload)
    progress = cfg.train.progress and D.is_main()  # one progress bar: rank 0's
    meter.pause()  # θ0 evaluation (and EWC's Fisher) run at full speed; step 1 resumes measuring
    anchor = anchor_for_run(  # before the resume: θ0
        cfg, run_dir, model, general=data.general, pad_id=tokenizer.pad_token_id, autocast=autocast,
        resuming=resume_from is not None, progress=progress,
    )  # fmt: skip
    drift_refs, unsaved = drift.references_for_run(cfg, run_dir, model, data, autocast=autocast, precision=precision,
                                                   resuming=resume_from is not None)  # fmt: skip
    objective.cached, kl_unsaved = kl_reference.reference_for_run(
        cfg, run_dir, model, data, autocast=autocast, precision=precision, resuming=resume_from is not None
    )  # θ0's top-k at every trainable target (loss.kl_reference: cached), before the resume
    unsaved += kl_unsaved
    state = TrainerState()
    if resume_from is not None:
        state = _resume(resume_from, run_dir, cfg, model=model, optimizer=optimizer, sampler=sampler,
                        total=total, precision=precision)  # fmt: skip
    state.total_steps, state.precision = total, precision
    if state.results.memory is not None or cfg.train.memory_steps == 0:
        meter.stop()  # measured before the resume, or not wanted
    flops, peak = flop_model(model), run_peak(cfg, model, precision, device)
    check_run_time(cfg, total_steps=total - state.step, epoch_flops=_epoch_flops(flops, data),
                   steps_per_epoch=sampler.steps_per_epoch, peak=peak)  # fmt: skip
    if D.is_main():  # nothing of an earlier run is moved before this point
        rundir.start_run_dir(run_dir, resume_from is None, cfg)
        records.trim(run_dir, state.step)  # a resumed run scores the steps past its checkpoint again
    drift.save_references(unsaved)  # (a barrier)
    _describe(cfg, device=device, precision=precision, total=total, sampler=sampler, optimizer=optimizer)
    return Run(
        cfg=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, data=data, optimizer=optimizer,
        sampler=sampler, total_steps=total, lr_multiplier=schedule_fn(cfg.schedule, cfg.optim.lr, total),
        autocast=autocast, precision=precision, device=device, state=state,
        memory=RunMemory(meter, model, cfg, precision=precision, state=state,
                         anchor_bytes=(anchor.nbytes if anchor else 0) + objective.theta0_nbytes),
        metrics=MetricsLog(run_dir, log_interval=cfg.train.log_interval, resumed_step=state.step, writer=D.is_main(),
                           trackers=open_trackers(trackers_of(cfg.train), run_dir, config=cfg.to_dict(),
                                                  resumed_step=state.step) if D.is_main() else []),
        checkpointer=Checkpointer(run_dir, cfg.train.save_interval, cfg.train.keep_checkpoints, total),
        evaluator=Evaluator(cfg.train.val_interval, cfg.eval.probe_interval, total,
                            has_val=bool(data.val or drift_refs), has_probes=data.probes is not None),
        flops=flops, peak_flops=peak, progress=progress,
        anchor=anchor, objective=objective, drift=drift_refs,
    )  # fmt: skip


def _load_model(cfg: RunConfig, precision: str, device) -> tuple:
    """θ0 (or, under FSDP2, this rank's shards of it) on the device, in the run's precision."""
    if D.sharded():
        return D.load_sharded(cfg.model, precision, device)  # FSDP2: each rank keeps 1/G of every weight
    model, tokenizer, _ = load_theta0(cfg.model)
    model.to(device)
    if precision == "bf16":
        cast_weights(model, torch.bfloat16)  # RoPE's inv_freq stays fp32
        print("[model] pure bf16: every weight cast to bfloat16, no fp32 copy kept", flush=True)
    make_resident(model)  # the CPU memory check counts the weights as resident before step 1
    return model, tokenizer


def _sampler(cfg: RunConfig, data: TaskData) -> StepSampler:
    t = cfg.train
    lengths = [len(e.input_ids) for e in data.train] if cfg.data.group_by_length else None
    sampler = StepSampler(len(data.train), t.micro_batch_size, t.grad_accum_steps, t.seed, lengths=lengths)
    if cfg.data.mix_ratio > 0:
        sizes = [len(e.lengths) or 1 for e in data.train]  # packed rows count as their sequences
        sampler = MixedSampler(sampler, len(data.general), cfg.data.mix_ratio, t.seed, sizes=sizes)
    return sampler


def _total_steps(cfg: RunConfig, sampler: StepSampler) -> int:
    total = cfg.train.max_steps or math.ceil(sampler.steps_per_epoch * cfg.train.epochs)
    if cfg.schedule.warmup_steps > total:
        print(
            f"[train] warning: schedule.warmup_steps {cfg.schedule.warmup_steps} is longer than the run "
            f"({total} steps): the warmup is cut to {total} and the peak lr is reached only at the last step",
            flush=True,
        )
    return total


def _epoch_flops(flops: FlopModel, data: TaskData) -> float:
    """Model FLOPs of one epoch of the task data (throughput.py's formula)."""
    lengths = [n for e in data.train for n in (e.lengths or (len(e.input_ids),))]
    return flops.step_flops(lengths, sum(sum(e.target_mask[1:]) for e in data.train))


def _describe(cfg: RunConfig, *, device, precision: str, total: int, sampler, optimizer) -> None:
    ranks = f", FSDP2 over {D.world_size()} rank{'s' if D.world_size() > 1 else ''}" if D.sharded() else ""
    groups = len(optimizer.param_groups)
    how = (
        f"step in backward ({groups} per-parameter optimisers)"
        if cfg.train.optimizer_in_backward
        else f"{groups} parameter groups"
    )
    print(
        f"[train] device {device}{ranks}, precision {precision}, {total} steps "
        f"({sampler.steps_per_epoch} per epoch, batch {cfg.train.micro_batch_size}×{cfg.train.grad_accum_steps}), "
        f"{cfg.optim.name}, {how}",
        flush=True,
    )


def _resume(
    path: Path, run_dir: Path, cfg: RunConfig, *, model, optimizer, sampler, total: int, precision: str
) -> TrainerState:
    """Restore a checkpoint; refuse settings that would silently change the resumed run."""
    checkpoint.check_compatible(path, cfg)
    state = checkpoint.load_checkpoint(path, model, optimizer)
    weights_loaded(optimizer)  # optim.cpu_offload: its CPU copies of the weights from the checkpoint, not θ0
    checkpoint.check_resumed_run(path, state, cfg, total=total, precision=precision)
    sampler.load_state_dict(state.sampler)
    if D.is_main():  # metrics.jsonl past this step is trimmed by the run's MetricsLog
        checkpoint.drop_later_checkpoints(run_dir, state.step)  # from an abandoned future of this run
    print(f"[train] resumed from {path} at step {state.step}", flush=True)
    return state
