"""`fulltune plan`: does full fine-tuning fit, and if not, what does — with the numbers that decided.

Branches, in order: full FT on one GPU; full FT with FSDP2/ZeRO-3 over the GPUs given; full FT
with memory savers (activation checkpointing, 8-bit AdamW states, micro-batch 1 with more
accumulation), each with its throughput cost; LoRA; QLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.report import GPUS
from fulltune.memory.spec import ModelSpec

# Throughput costs, as rules of thumb (not measured here): checkpointing recomputes the forward
# (≈ 1/3 of forward+backward); 8-bit optimiser states cost a few % in the optimiser step.
SAVERS = (
    ("activation checkpointing", {"activation_checkpointing": True}, "≈ +33% compute (one more forward per step)"),
    ("8-bit AdamW states", {"optimizer": "adamw8bit"}, "a few % slower optimiser step; 2.03 instead of 8 B/param"),
    ("micro-batch 1 + gradient accumulation", {"micro_batch": 1}, "same update, lower GPU utilisation per step"),
)


@dataclass
class Plan:
    branch: str                  # full | full-zero3 | full-savers | lora | qlora | none
    summary: str
    evidence: list[str]
    notes: list[str]


def _fits(spec: ModelSpec, setup: TrainSetup, capacity: float) -> tuple[bool, float]:
    peak = estimate(spec, setup).peak
    return peak <= capacity, peak


def _line(label: str, peak: float, capacity: float) -> str:
    return f"{label}: {peak / GB:.1f} GB per GPU {'≤' if peak <= capacity else '>'} {capacity / GB:.0f} GB"


def _savers(spec, base: TrainSetup, capacity: float, evidence: list[str]) -> tuple[TrainSetup, list[str]] | None:
    setup, used = base, []
    for label, change, cost in SAVERS:
        setup = replace(setup, **change)
        used.append(f"{label} ({cost})")
        ok, peak = _fits(spec, setup, capacity)
        evidence.append(_line(f"  + {label}", peak, capacity))
        if ok:
            return setup, used
    return None


def plan(spec: ModelSpec, gpu: str, n_gpus: int, base: TrainSetup) -> Plan:
    name, cap_gb = GPUS[gpu]
    capacity = cap_gb * GB
    evidence: list[str] = []
    notes = _notes(spec)
    one = replace(base, gpus=1, zero_stage=0, method="full")
    ok, peak = _fits(spec, one, capacity)
    evidence.append(_line("full fine-tuning on 1 GPU", peak, capacity))
    if ok:
        return Plan("full", f"full fine-tuning fits on one {name}: fulltune train CONFIG", evidence, notes)
    sharded = replace(one, gpus=n_gpus, zero_stage=3)
    if n_gpus > 1:
        ok, peak = _fits(spec, sharded, capacity)
        evidence.append(_line(f"full fine-tuning, FSDP2/ZeRO-3 over {n_gpus} GPUs", peak, capacity))
        if ok:
            notes.append(_zero3_command(n_gpus))
            return Plan("full-zero3", f"full fine-tuning with FSDP2 (ZeRO-3) over {n_gpus}× {name}", evidence, notes)
    evidence.append("memory savers, added one at a time:")
    saved = _savers(spec, sharded if n_gpus > 1 else one, capacity, evidence)
    if saved is not None:
        if n_gpus > 1:
            notes.append(_zero3_command(n_gpus))
        if saved[0].optimizer == "adamw8bit":
            notes.append("8-bit AdamW is in the estimator only; this version trains with adamw or sgd")
        return Plan("full-savers", f"full fine-tuning fits on {n_gpus}× {name} with: " + "; ".join(saved[1]),
                    evidence, notes)
    for method in ("lora", "qlora"):
        adapter = replace(one, method=method, activation_checkpointing=method == "qlora")
        ok, peak = _fits(spec, adapter, capacity)
        evidence.append(_line(f"{method.upper()} (rank {base.lora_rank}) on 1 GPU", peak, capacity))
        if ok:
            return Plan(method, f"full fine-tuning does not fit on {n_gpus}× {name}; {method.upper()} does", evidence, notes)
    return Plan("none", f"nothing fits on {n_gpus}× {name}, not even QLoRA; more or bigger GPUs", evidence, notes)


def _zero3_command(n_gpus: int) -> str:
    return (f"run it: fulltune train CONFIG --nproc {n_gpus} (one node), or on each node: torchrun --nnodes=NODES "
            "--nproc-per-node=GPUS --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=RUN --shutdown-timeout=900 "
            "-m fulltune train "
            "CONFIG; the global batch stays micro_batch_size × grad_accum_steps (README: Many GPUs and nodes)")


def _notes(spec: ModelSpec) -> list[str]:
    notes = []
    if spec.n_params < 1e9:
        notes.append(f"{spec.n_params / 1e6:.0f}M parameters (< 1B): full fine-tuning is cheap and the quality baseline")
    notes.append("full fine-tuning wins for maximum quality and single-task deployment (one model, no adapters); "
                 "it forgets more: measure general skills before and after")
    return notes


def render(p: Plan) -> str:
    return "\n".join([f"plan: {p.summary}", "", "evidence:"] + [f"  {e}" for e in p.evidence]
                     + ["", "notes:"] + [f"  - {n}" for n in p.notes])
