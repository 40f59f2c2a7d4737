"""The checks of a config that compare several of its values (config.py checks each value alone),
and the run-length rule: more than LONG_RUN optimiser steps needs train.allow_long_run."""

from __future__ import annotations

import math
import typing

from fulltune.errors import UserError, short

if typing.TYPE_CHECKING:
    from fulltune.config import RunConfig, TrainConfig

LONG_RUN = 10**7  # optimiser steps; ~1e9 epochs is a typo, not a plan (SmolLM2 does ~1 step/s on a CPU)


def cross_checks(cfg: RunConfig) -> list[str]:
    """Every problem of the values together, each as 'key: what is wrong'."""
    return _cross_checks(cfg) + _memory_checks(cfg) + _length_checks(cfg.train) + _flash_checks(cfg)


def _flash_checks(cfg: RunConfig) -> list[str]:
    """flash_attention_2 computes in fp16/bf16 only. (Packed micro-batches of several rows run as one
    row, where its varlen path finds the sequences: data/packing.as_one_row.)"""
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.train.precision == "fp32":
        return [
            "model.attn_implementation: flash_attention_2 computes in fp16/bf16 only; "
            "with train.precision fp32 use sdpa"
        ]
    return []


def _length_checks(t: TrainConfig) -> list[str]:
    """A run of more than LONG_RUN steps is refused unless asked for: each epoch is at least one step."""
    if t.allow_long_run:
        return []
    if t.max_steps > LONG_RUN:
        return [f"train.max_steps: {t.max_steps:,} optimiser steps is more than {LONG_RUN:,}; {_ASK}"]
    if not t.max_steps and t.epochs > LONG_RUN:
        return [
            f"train.epochs: {t.epochs:g} epochs is at least {math.ceil(t.epochs):,} optimiser steps (one or more "
            f"each), more than {LONG_RUN:,}; {_ASK}"
        ]
    return []


_ASK = "if you mean it, set train.allow_long_run=true"


def planned_steps(cfg: RunConfig, records: int) -> int:
    """Optimiser steps from the record count (before tokenising, packing or dropping overlong ones)."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if not cfg.data.validation and cfg.data.val_fraction > 0:
        records -= max(1, round(cfg.data.val_fraction * records))
    return math.ceil(math.ceil(max(records, 1) / (t.micro_batch_size * t.grad_accum_steps)) * t.epochs)


def check_run_length(cfg: RunConfig, records: int) -> None:
    """The run-length rule once the training records are counted (setup, `fulltune schedule`)."""
    t = cfg.train
    steps = planned_steps(cfg, records)
    if t.allow_long_run or steps <= LONG_RUN:
        return
    raise UserError(
        f"train.epochs: {t.epochs:g} epochs of {records:,} records at {t.micro_batch_size}×{t.grad_accum_steps} "
        f"sequences a step is about {steps:,} optimiser steps, more than {LONG_RUN:,}; {_ASK}"
    )


LONG_TIME_S = 24 * 3600  # a run predicted to take more than a day, even at the machine's measured matmul peak


def check_run_time(cfg: RunConfig, *, total_steps: int, epoch_flops: float, steps_per_epoch: int, peak: float) -> None:
    """More than a day of steps at the measured rate asks for train.allow_long_run first. The time is
    a lower bound: every FLOP of every step at the matmul peak measured at setup (100% MFU; the
    quickstart reaches 12-50%), so a run refused here would take longer still."""
    if cfg.train.allow_long_run or peak <= 0 or steps_per_epoch <= 0:
        return
    seconds = total_steps * epoch_flops / steps_per_epoch / peak
    if seconds <= LONG_TIME_S:
        return
    raise UserError(
        f"train.epochs / train.max_steps: {total_steps:,} optimiser steps would take at least {seconds / 3600:,.0f} "
        f"hours here ({epoch_flops / steps_per_epoch:.3g} FLOPs a step at the measured matmul peak of "
        f"{peak / 1e12:.3g} TFLOP/s), more than a day; {_ASK}"
    )


def _cross_checks(cfg: RunConfig) -> list[str]:
    errors = []
    from fulltune.trackers import LOGGERS

    for name in cfg.train.loggers:
        if name not in LOGGERS:
            errors.append(f"train.loggers: {short(name)} is not one of {', '.join(LOGGERS)}")
            break
    betas = cfg.optim.betas
    if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        errors.append(f"optim.betas: expected two numbers in [0, 1), got {short(betas)}")
    if not all(isinstance(x, str) for x in cfg.eval.probes):
        errors.append(f"eval.probes: expected a list of probe names, got {short(cfg.eval.probes)}")
    errors += _budget_checks(cfg.eval)
    labels = cfg.eval.labels
    if not all(isinstance(x, str) for x in labels):
        yaml_words = " (YAML reads yes/no/on/off/true/false as booleans: quote them)" * any(
            isinstance(x, bool) for x in labels
        )
        errors.append(f"eval.labels: expected a list of strings, got {short(labels)}{yaml_words}")
    elif len(set(labels)) < len(labels):
        errors.append(f"eval.labels: {next(x for x in labels if labels.count(x) > 1)!r} is given twice")
    if cfg.eval.task_file and len(cfg.eval.labels) < 2:
        errors.append("eval.labels: task accuracy needs at least two labels")
    if not all(isinstance(x, str) and x for x in cfg.data.general):
        errors.append(f"data.general: expected a list of data files, got {short(cfg.data.general)}")
    if cfg.data.mix_ratio > 0 and not cfg.data.general and not cfg.data.replay:
        errors.append(
            "data.mix_ratio: mixing needs general data in data.general (e.g. [builtin:lambada]) or data.replay"
        )
    if cfg.anchor.method == "ewc" and not cfg.data.general:
        errors.append("anchor.method: ewc estimates its Fisher on data.general; set it (e.g. [builtin:lambada])")
    if cfg.anchor.lam > 0 and cfg.anchor.method == "none":
        errors.append(f"anchor.lam: {cfg.anchor.lam} has no effect with anchor.method none (choose l2sp or ewc)")
    if cfg.optim.decay_toward == "theta0" and cfg.optim.weight_decay == 0:
        errors.append("optim.decay_toward: theta0 needs optim.weight_decay > 0 to have any effect")
    if not cfg.data.train.strip():
        errors.append(
            "data.train: empty; name the training data (a file, a save_to_disk directory or builtin:sst2/train)"
        )
    if not cfg.model.path.strip():
        errors.append("model.path: empty; name θ0 (an HF model directory, a .gguf file, or default)")
    if not cfg.train.output_dir.strip():
        errors.append("train.output_dir: empty; name the run's directory (an empty one would be the current directory)")
    if 0 < cfg.optim.lr < cfg.schedule.min_lr:
        errors.append(f"schedule.min_lr: {cfg.schedule.min_lr} is above optim.lr {cfg.optim.lr}")
    if cfg.data.packing and cfg.data.group_by_length:
        errors.append(
            "data.group_by_length: packed rows are already near max_seq_len; use one of data.packing "
            "and data.group_by_length"
        )
    return errors


def _budget_checks(e) -> list[str]:
    """eval.forgetting_budget names probes the run has, with limits ≥ 0, and needs the task to rank steps."""
    from fulltune.evals.probes import probe_name

    if not e.forgetting_budget:
        return []
    names = [probe_name(p) for p in e.probes if isinstance(p, str)]
    errors = [
        f"eval.forgetting_budget.{k}: not a probe of this run (eval.probes: {', '.join(names) or 'none'})"
        for k in e.forgetting_budget
        if k not in names
    ]
    errors += [
        f"eval.forgetting_budget.{k}: expected a number ≥ 0 (accuracy points or % of NLL), got {short(v)}"
        for k, v in e.forgetting_budget.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")
    ]
    if not e.task_file:
        errors.append("eval.forgetting_budget: ranking the steps inside the budget needs eval.task_file")
    return errors


def _offload_checks(cfg: RunConfig) -> list[str]:
    """torchao's CPUOffloadOptimizer copies each gradient to the CPU the moment backward completes it,
    frees the GPU's, and steps the CPU copy: nothing after backward reaches the update."""
    if not cfg.optim.cpu_offload:
        return []
    o, errors = cfg.optim, []
    if o.grad_clip > 0:
        errors.append(
            f"optim.grad_clip: {o.grad_clip} with optim.cpu_offload, which copies each gradient to the CPU "
            "before the global norm exists (the clip would miss the update); set optim.grad_clip=0"
        )
    if cfg.train.grad_accum_steps > 1:
        errors.append(
            f"train.grad_accum_steps: {cfg.train.grad_accum_steps} with optim.cpu_offload, which frees each GPU "
            "gradient once copied: only the last micro-batch would be stepped; use 1 and a larger micro_batch_size"
        )
    if cfg.anchor.lam > 0 or o.decay_toward == "theta0":
        errors.append(
            "anchor / optim.decay_toward: with optim.cpu_offload the update happens on the CPU copies, where "
            "the pulls toward θ0 do not reach; turn one of them off"
        )
    return errors


def _memory_checks(cfg: RunConfig) -> list[str]:
    """Combinations of the memory savers that cannot work, refused before any model loads."""
    errors, t = [], cfg.train
    if t.optimizer_in_backward:
        why = "train.optimizer_in_backward updates each parameter inside backward"
        if t.grad_accum_steps > 1:
            errors.append(
                f"train.grad_accum_steps: {t.grad_accum_steps} with {why}, i.e. once per micro-batch; "
                "use grad_accum_steps 1 (and a larger micro_batch_size) or turn it off"
            )
        if cfg.optim.cpu_offload:
            errors.append(
                "optim.cpu_offload: torchao's CPU offload already steps each parameter from a backward hook; "
                "use one of the two with train.optimizer_in_backward"
            )
        if cfg.anchor.lam > 0 or cfg.optim.decay_toward == "theta0":
            errors.append(
                "anchor / optim.decay_toward: the pulls toward θ0 are applied after backward; this version "
                "does not combine them with train.optimizer_in_backward"
            )
    if cfg.optim.name == "adam_mini":
        errors += [
            f"{key}: adam_mini's package steps every tensor at once, by name, with no stochastic rounding; "
            f"this version does not combine it with {what}"
            for key, what, on in (
                ("train.optimizer_in_backward", "the step in backward", t.optimizer_in_backward),
                ("train.precision", "pure bf16 (use bf16-mixed)", t.precision == "bf16"),
                ("optim.cpu_offload", "CPU offload", cfg.optim.cpu_offload),
            )
            if on
        ]
    errors += _offload_checks(cfg)
    if cfg.optim.name == "muon" and cfg.optim.cpu_offload:
        errors.append(
            "optim.cpu_offload: torchao's CPU offload wraps one optimiser class, and muon is two (Muon and "
            "AdamW); turn one of them off"
        )
    if cfg.optim.name in ("galore", "apollo", "apollo_mini") and cfg.optim.cpu_offload:
        errors.append(
            f"optim.cpu_offload: torchao's CPU offload wraps one optimiser class, and {cfg.optim.name} keeps "
            "its projections on the parameters' device; turn one of them off"
        )
    if cfg.optim.project_embeddings and cfg.optim.name not in ("galore", "apollo", "apollo_mini"):
        errors.append(
            f"optim.project_embeddings: only galore, apollo and apollo_mini project gradients, not {cfg.optim.name}"
        )
    if t.precision == "bf16" and cfg.optim.name in ("sgd", "adafactor") and cfg.optim.cpu_offload:
        errors.append(
            f"optim.cpu_offload: torchao's CPU offload wraps one optimiser class, and {cfg.optim.name} in "
            "train.precision bf16 steps each tensor in fp32 with stochastic rounding around it; use adamw, "
            "adamw8bit or adamw4bit, or train.precision bf16-mixed"
        )
    return errors
