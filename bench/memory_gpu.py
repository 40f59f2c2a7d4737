"""Measured CUDA peak vs the estimator on random-init LLaMA-shaped models (0.5–3B), bf16 autocast.

Runs fulltune's own train_step (fp32 master weights, bf16 autocast, fused AdamW, loss on every
position) for a few steps per (model, micro-batch, sequence length) and prints
torch.cuda.max_memory_allocated next to the estimate for the same setup. Budget: < 8 minutes on
one GPU. `--cpu-tiny` runs one tiny shape on the CPU (what the tests do without a GPU).

    python bench/memory_gpu.py            # on a GPU machine
    python bench/memory_gpu.py --cpu-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch

from fulltune.config import OptimConfig
from fulltune.data.formats import Example
from fulltune.data.loader import collate
from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.measure import PeakMeter, malloc_restored
from fulltune.memory.spec import spec_from_config
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import train_step

SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads), vocab 32000, untied
    "0.5B": (1024, 2816, 24, 16, 16),
    "1.1B": (2048, 5632, 22, 32, 4),
    "3B": (3200, 8640, 26, 32, 32),
    "tiny": (128, 344, 2, 4, 2),
}
GRID = [("0.5B", 4, 1024), ("0.5B", 8, 2048), ("1.1B", 2, 2048), ("1.1B", 4, 4096), ("3B", 1, 2048), ("3B", 2, 4096)]


def build(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, layers, heads, kv = SHAPES[name]
    config = LlamaConfig(
        vocab_size=32000 if name != "tiny" else 512,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).float()
    model.config._attn_implementation = "sdpa"
    return model, config


def measure(name: str, batch: int, seq: int, device: str, steps: int) -> dict:
    with malloc_restored():  # the meter leaves glibc in fast mode; the caller gets its own settings back
        return _measure(name, batch, seq, device, steps)


def _measure(name: str, batch: int, seq: int, device: str, steps: int) -> dict:
    model, config = build(name, device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    examples = [
        Example(torch.randint(3, config.vocab_size, (seq,), generator=g).tolist(), [1] * seq) for _ in range(batch)
    ]
    batch_t = collate(examples, pad_id=0, device=device)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    meter = PeakMeter(device).start()
    t0 = time.perf_counter()
    for _ in range(steps):
        with meter.section("train"):
            train_step(model, optimizer, [batch_t], autocast, grad_clip=1.0)
    elapsed = time.perf_counter() - t0
    meter.stop()
    setup = TrainSetup(
        micro_batch=batch,
        seq_len=seq,
        precision="bf16-mixed" if device == "cuda" else "fp32",
        loss_fraction=(seq - 1) / seq,
        device=device,
    )
    est = estimate(spec_from_config(config, name), setup)
    predicted = est.peak - est.get("CUDA context")  # not in the allocator's figures
    # CUDA: absolute allocated peak (the weights were allocated before the meter started); CPU: above baseline.
    measured = meter.sections["train"] - (0 if device == "cuda" else meter.baseline)
    result = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "seq": seq,
        "predicted_gb": predicted / GB,
        "measured_gb": measured / GB,
        "reserved_gb": meter.sections.get("train_reserved", 0) / GB,
        "error_pct": 100 * (predicted - measured) / measured,
        "tokens_per_s": steps * batch * seq / elapsed,
    }
    del model, optimizer, batch_t
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = "cpu" if args.cpu_tiny else "cuda"
    grid = [("tiny", 2, 64)] if args.cpu_tiny else GRID
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| model | params | micro-batch × seq | predicted (GB) | measured allocated (GB) | reserved (GB) | "
        "error | tokens/s |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, batch, seq in grid:
        r = measure(name, batch, seq, device, args.steps)
        print(
            f"| {r['model']} | {r['params'] / 1e9:.2f}B | {batch}×{seq} | {r['predicted_gb']:.2f} | "
            f"{r['measured_gb']:.2f} | {r['reserved_gb']:.2f} | {r['error_pct']:+.1f}% | {r['tokens_per_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
