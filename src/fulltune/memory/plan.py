"""`fulltune plan`: does full fine-tuning fit, and how — only with modes this version trains, printed
as the exact `fulltune train` overrides, with the numbers that decided.

Branches, in order: full FT on one GPU as `train.precision: auto` runs it; FSDP2/ZeRO-3 over the GPUs
given; memory savers added one at a time, cheapest first (each a config key); and if nothing fits,
what LoRA / QLoRA would need, for comparison (fulltune does not train adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.gpus import GPUS
from fulltune.memory.spec import ModelSpec


@dataclass(frozen=True)
class Saver:
    label: str
    change: dict  # TrainSetup fields
    overrides: dict  # the fulltune train keys that run it
    cost: str
    one_process_only: bool = False  # not combined with FSDP2 in this version
    drops: tuple = ()  # override keys of an earlier saver this one replaces


# Cheapest first. Costs are rules of thumb or measured on CPU (docs/memory.md); GPU costs unmeasured.
SAVERS = (
    Saver(
        "activation checkpointing",
        {"activation_checkpointing": True},
        {"model.activation_checkpointing": "true"},
        "≈ +33% compute (one more forward per layer)",
    ),
    Saver(
        "pure bf16 weights and gradients",
        {"precision": "bf16"},
        {"train.precision": "bf16"},
        "no fp32 copy; updates stochastically rounded (quality: docs/memory.md)",
    ),
    Saver(
        "optimizer step in backward",
        {"optimizer_in_backward": True},
        {"train.optimizer_in_backward": "true", "optim.grad_clip": "0", "train.grad_accum_steps": "1"},
        "no gradient clipping and no accumulation",
        one_process_only=True,
    ),
    Saver(
        "8-bit AdamW",
        {"optimizer": "adamw8bit"},
        {"optim.name": "adamw8bit"},
        "≈2 instead of 8 B/param of state",
        one_process_only=True,
    ),
    Saver(
        "4-bit AdamW",
        {"optimizer": "adamw4bit"},
        {"optim.name": "adamw4bit"},
        "≈1 B/param of state",
        one_process_only=True,
    ),
    Saver(
        "activation offload to CPU",
        {"activation_offload": True},
        {"model.activation_offload": "true"},
        "saved activations cross PCIe twice per step",
    ),
    Saver(
        "optimizer state offloaded to CPU (instead of the step in backward)",
        {"cpu_offload": True, "optimizer_in_backward": False},
        {"optim.cpu_offload": "true", "optim.grad_clip": "0", "train.grad_accum_steps": "1"},
        "the optimizer steps on the CPU (no clipping, no accumulation); needs host RAM for the state",
        one_process_only=True,
        drops=("train.optimizer_in_backward",),
    ),
    Saver(
        "micro-batch 1",
        {"micro_batch": 1},
        {"train.micro_batch_size": "1"},
        "fewer sequences per step (raise grad_accum_steps where the step is not in backward)",
    ),
    Saver(
        "APOLLO-Mini on every matrix, the step in backward (train.memory=floor's optimiser; replaces CPU offload)",
        {"optimizer": "apollo_mini", "project_embeddings": True, "cpu_offload": False, "optimizer_in_backward": True},
        {"optim.name": "apollo_mini", "optim.project_embeddings": "true", "train.optimizer_in_backward": "true"},
        "rank-1 projected state, the least fulltune trains (2.01 B/param with bf16 and the step in "
        "backward, measured on CPU); its task quality is not measured yet: docs/memory.md",
        one_process_only=True,
        drops=("optim.cpu_offload",),
    ),
)


@dataclass(kw_only=True)
class Plan:
    branch: str  # full | full-zero3 | full-savers | none (lora / qlora: for comparison only)
    summary: str
    evidence: list[str]
    notes: list[str]
    overrides: dict | None = None


def _fits(spec: ModelSpec, setup: TrainSetup, capacity: float) -> tuple[bool, float]:
    peak = estimate(spec, setup).peak
    return peak <= capacity, peak


def _line(label: str, peak: float, capacity: float) -> str:
    return f"{label}: {peak / GB:.1f} GB per GPU {'≤' if peak <= capacity else '>'} {capacity / GB:.0f} GB"


def command(overrides: dict, n_gpus: int = 1) -> str:
    nproc = f" --nproc {n_gpus}" if n_gpus > 1 else ""
    return "fulltune train CONFIG" + nproc + "".join(f" {k}={v}" for k, v in overrides.items())


def _on_cpu(saver: Saver) -> bool:
    """What a CPU run can take: no CUDA offload, and pure bf16 only where the CPU has bf16 units."""
    from fulltune.runtime import cpu_has_bf16_units

    if saver.change.keys() & {"activation_offload", "cpu_offload"}:
        return False
    return saver.change.get("precision") != "bf16" or cpu_has_bf16_units()


def _savers(spec, base: TrainSetup, *, capacity: float, evidence: list[str], n_gpus: int):
    setup, overrides, used = base, {}, []
    for saver in SAVERS:
        if (saver.one_process_only and n_gpus > 1) or (base.device == "cpu" and not _on_cpu(saver)):
            continue
        setup = replace(setup, **saver.change)
        overrides.update(saver.overrides)
        for key in saver.drops:
            overrides.pop(key, None)
        used.append(f"{saver.label} ({saver.cost})")
        ok, peak = _fits(spec, setup, capacity)
        evidence.append(_line(f"  + {saver.label}", peak, capacity))
        if ok:
            return overrides, used
    return None


def plan(spec: ModelSpec, gpu: str, n_gpus: int, base: TrainSetup, *, device: tuple[str, float] | None = None) -> Plan:
    """What to run on `n_gpus` × `gpu` (or `device`: a (name, GB available) of this machine)."""
    name, cap_gb = device or GPUS[gpu]
    capacity = cap_gb * GB
    evidence: list[str] = []
    notes = _notes(spec)
    one = replace(base, gpus=1, zero_stage=0, method="full")
    ok, peak = _fits(spec, one, capacity)
    evidence.append(_line(f"full fine-tuning ({base.precision}, {base.optimizer}) on 1 GPU", peak, capacity))
    if ok:
        summary = f"full fine-tuning fits on one {name}: {command({})}"
        return Plan(branch="full", summary=summary, evidence=evidence, notes=notes, overrides={})
    sharded = replace(one, gpus=n_gpus, zero_stage=3)
    if n_gpus > 1:
        ok, peak = _fits(spec, sharded, capacity)
        evidence.append(_line(f"full fine-tuning, FSDP2/ZeRO-3 over {n_gpus} GPUs", peak, capacity))
        if ok:
            notes.append(_zero3_command(n_gpus))
            summary = f"full fine-tuning with FSDP2 (ZeRO-3) over {n_gpus}× {name}: {command({}, n_gpus)}"
            return Plan(branch="full-zero3", summary=summary, evidence=evidence, notes=notes, overrides={})
    evidence.append("memory savers, added one at a time:")
    saved = _savers(spec, sharded if n_gpus > 1 else one, capacity=capacity, evidence=evidence, n_gpus=n_gpus)
    if saved is not None:
        overrides, used = saved
        if n_gpus > 1:
            notes.append(_zero3_command(n_gpus))
        notes.append("with: " + "; ".join(used))
        return Plan(
            branch="full-savers",
            summary=f"full fine-tuning fits on {n_gpus}× {name}: {command(overrides, n_gpus)}",
            evidence=evidence,
            notes=notes,
            overrides=overrides,
        )
    for method in ("lora", "qlora"):
        adapter = replace(one, method=method, activation_checkpointing=method == "qlora")
        ok, peak = _fits(spec, adapter, capacity)
        evidence.append(_line(f"for comparison: {method.upper()} (rank {base.lora_rank}) on 1 GPU", peak, capacity))
        if ok:
            return Plan(
                branch="none",
                summary=f"full fine-tuning does not fit on {n_gpus}× {name}, not even with every saver fulltune "
                f"trains; more GPUs, or {method.upper()} with another tool (fulltune trains every weight)",
                evidence=evidence,
                notes=notes,
            )
    summary = f"nothing fits on {n_gpus}× {name}, not even QLoRA; more or bigger GPUs"
    return Plan(branch="none", summary=summary, evidence=evidence, notes=notes)


def _zero3_command(n_gpus: int) -> str:
    return (
        f"run it: fulltune train CONFIG --nproc {n_gpus} (one node), or on each node: torchrun --nnodes=NODES "
        "--nproc-per-node=GPUS --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=RUN --shutdown-timeout=900 "
        "-m fulltune train "
        "CONFIG; the global batch stays micro_batch_size × grad_accum_steps (README: Many GPUs and nodes)"
    )


def _notes(spec: ModelSpec) -> list[str]:
    notes = []
    if spec.n_params < 1e9:
        notes.append(
            f"{spec.n_params / 1e6:.0f}M parameters (< 1B): full fine-tuning is cheap and the quality baseline"
        )
    notes.append(
        "full fine-tuning wins for maximum quality and single-task deployment (one model, no adapters); "
        "it forgets more: measure general skills before and after"
    )
    return notes


def render(p: Plan) -> str:
    return "\n".join(
        [f"plan: {p.summary}", "", "evidence:"]
        + [f"  {e}" for e in p.evidence]
        + ["", "notes:"]
        + [f"  - {n}" for n in p.notes]
    )
