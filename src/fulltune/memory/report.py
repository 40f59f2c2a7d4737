"""Printing estimates: the detailed per-GPU breakdown and the seed's 16N table."""

from __future__ import annotations

import math

from fulltune.memory.estimate import GB, Estimate, estimate
from fulltune.memory.gpus import GPUS
from fulltune.memory.spec import load_spec

SEED_MODELS = (("LLaMA-7B", "llama-7b"), ("LLaMA-13B", "llama-13b"), ("LLaMA-70B", "llama-70b"))
SEED_K, SEED_S, SEED_B = 12, 2048, 1


def seed_row(label: str, preset: str, gpu_gb: int = 80) -> dict:
    """The seed's arithmetic: 16 bytes × nominal N, plus s·b·d·L·k activations; GPUs = ceil(int(total)/80)."""
    spec = load_spec(preset)
    states = 16 * spec.nominal / GB
    acts = SEED_S * SEED_B * spec.hidden * spec.layers * SEED_K / GB
    total = round(states, 1) + round(acts, 1)
    return {"model": label, "states": states, "acts": acts, "total": total, "gpus": math.ceil(int(total) / gpu_gb)}


def seed_table() -> str:
    lines = [
        f"Seed formula: 16N (bf16 weights + bf16 grads + fp32 master, m, v) + s·b·d·L·k activations "
        f"(s = {SEED_S}, b = {SEED_B}, k = {SEED_K}); GPUs = ceil(int(total) / 80)",
        "",
        f"{'model':<10} {'16N (GB)':>9} {'act. (GB)':>10} {'total (GB)':>11}  A100-80GB",
    ]
    for label, preset in SEED_MODELS:
        r = seed_row(label, preset)
        lines.append(f"{label:<10} {r['states']:>9.1f} {r['acts']:>10.1f} {r['total']:>11.1f}  {r['gpus']}×")
    lines.append("")
    for label, preset in SEED_MODELS:
        r = seed_row(label, preset)
        lines.append(f"{label}: {r['states']:.1f} + {r['acts']:.1f} = {r['total']:.1f} GB, {r['gpus']}× A100-80GB")
    return "\n".join(lines)


def breakdown(est: Estimate) -> str:
    s, spec = est.setup, est.spec
    head = (
        f"{spec.name}: {spec.n_params:,} parameters ({spec.layers} layers, hidden {spec.hidden}, "
        f"vocab {spec.vocab}{', tied' if spec.tied else ''})\n"
        f"setup: {s.method} fine-tuning, {s.precision}, {s.optimizer}, micro-batch {s.micro_batch} × seq {s.seq_len}, "
        f"checkpointing {'on' if s.activation_checkpointing else 'off'}, {s.gpus} GPU(s)"
        + (f", ZeRO-{s.zero_stage}" if s.zero_stage else "")
        + f", device {s.device}\n"
    )
    rows = [f"  {t.name:<20} {t.bytes / GB:>9.2f} GB   {t.note}" for t in est.terms]
    tail = (
        f"  {'peak per GPU':<20} {est.peak / GB:>9.2f} GB   at the {est.peak_when}: what is alive together, "
        "not the sum of the rows"
    )
    return head + "\n".join(rows) + "\n" + tail


def fits_line(est: Estimate, gpu: str) -> str:
    name, capacity = GPUS[gpu]
    verdict = "fits" if est.peak <= capacity * GB else "does not fit"
    return f"{name}: {verdict} ({est.peak / GB:.1f} of {capacity} GB per GPU)"


def min_gpus_zero3(spec, setup, gpu: str) -> int | None:
    """Fewest GPUs of type `gpu` on which ZeRO-3 fits this setup."""
    from dataclasses import replace

    from fulltune.memory.estimate import gpus_needed

    capacity = GPUS[gpu][1] * GB
    return gpus_needed(lambda g: estimate(spec, replace(setup, gpus=g, zero_stage=3 if g > 1 else 0)).peak, capacity)
