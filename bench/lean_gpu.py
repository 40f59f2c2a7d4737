"""GPU check of the lean modes: random-init Llama-shaped 1B and 8B models, default vs lean, a few steps each.

Uses fulltune's own pieces (build_optimizer, train_step, the estimator), one process, one GPU:
  default  bf16-mixed (fp32 weights + bf16 autocast), fused AdamW, clipping at 1.0
  lean     pure bf16 weights, torchao AdamW4bit with stochastic rounding, step in backward,
           activation checkpointing (what train.memory=lean sets)
Prints the CUDA peak allocated (steps 2..N) against the estimate (without the CUDA context, which
the allocator never counts) and the tokens/s of the steps after the first (torch.compile warms up there).

    python bench/lean_gpu.py [--models 1b 8b] [--batch 1] [--seq 2048] [--steps 5]
    python bench/lean_gpu.py --cpu-tiny     # the same code path on a tiny model, on CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from fulltune.config import OptimConfig
from fulltune.data.formats import Example
from fulltune.data.loader import collate
from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.spec import PRESETS, spec_from_config
from fulltune.model import cast_weights, enable_activation_checkpointing
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import train_step

MODELS = {"1b": "llama3.2-1b", "8b": "llama3.1-8b"}
MODES = {
    "default": dict(precision="bf16-mixed", optimizer="adamw", in_backward=False, ckpt=False, clip=1.0),
    "lean": dict(precision="bf16", optimizer="adamw4bit", in_backward=True, ckpt=True, clip=0.0),
}


def config_of(preset: str, seq: int):
    from transformers import LlamaConfig

    fields = {k: v for k, v in PRESETS[preset].items() if k not in ("nominal", "model_type")}
    return LlamaConfig(**fields, max_position_embeddings=max(seq, 128))


def one(preset: str, mode: str, args, device: torch.device) -> str:
    from transformers import LlamaForCausalLM

    m = MODES[mode]
    config = config_of(preset, args.seq) if not args.cpu_tiny else _tiny_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = cast_weights(LlamaForCausalLM(config), torch.bfloat16 if m["precision"] == "bf16" else torch.float32)
    if m["ckpt"]:
        enable_activation_checkpointing(model)  # with model.py's fallback for an older transformers
    model.train()
    optimizer = build_optimizer(model, OptimConfig(name=m["optimizer"], lr=1e-5), m["precision"], m["in_backward"])
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if m["precision"] == "bf16-mixed"
        else contextlib.nullcontext
    )
    g = torch.Generator().manual_seed(0)
    seq = 64 if args.cpu_tiny else args.seq
    examples = [
        Example(torch.randint(3, config.vocab_size, (seq,), generator=g).tolist(), [1] * seq) for _ in range(args.batch)
    ]
    batch = collate(examples, 0, device)
    times = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, [batch], autocast, grad_clip=m["clip"]).loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    setup = TrainSetup(
        micro_batch=args.batch,
        seq_len=seq,
        precision=m["precision"],
        optimizer=m["optimizer"],
        optimizer_in_backward=m["in_backward"],
        activation_checkpointing=m["ckpt"],
        device=device.type,
    )
    est = estimate(spec_from_config(config, preset), setup)
    predicted = (est.peak - est.get("CUDA context")) / GB
    peak = torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else float("nan")
    steady = times[1:] or times
    tok_s = args.batch * seq / (sum(steady) / len(steady))
    return (
        f"{preset} {mode}: loss {loss:.3f}, step 1 {times[0]:.1f} s, {tok_s:,.0f} tok/s (steps 2-{args.steps}), "
        f"peak allocated {peak:.2f} GB, estimate {predicted:.2f} GB"
        + (f" ({100 * (predicted - peak) / peak:+.1f}%)" if peak == peak else "")
    )


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["1b", "8b"], choices=tuple(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cpu-tiny", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_tiny else "cuda")
    if device.type == "cuda":
        print(
            torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB", flush=True
        )
    for key in ["1b"] if args.cpu_tiny else args.models:
        for mode in MODES:
            try:
                print(one(MODELS[key], mode, args, device), flush=True)
            except torch.OutOfMemoryError as exc:
                print(f"{MODELS[key]} {mode}: out of memory ({str(exc).splitlines()[0][:160]})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
