"""FSDP2 on one GPU: a random-init 1.1B LLaMA-shaped model, bf16 MixedPrecisionPolicy, a few steps.

fulltune's own `distributed.shard` and `train_step` (fp32 shards as master weights, bf16 gathered
weights, fp32 gradient reduction, fused AdamW), in a one-rank process group. Prints tokens/s and
the CUDA allocator's peak next to the estimator's ZeRO-3 figure. Budget: ~2 minutes on one GPU.

    torchrun --nproc-per-node=1 bench/fsdp_gpu.py              # GPU (NCCL)
    torchrun --nproc-per-node=2 bench/fsdp_gpu.py --cpu-tiny   # CPU check of the script (gloo)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist

from fulltune import distributed as D
from fulltune.config import OptimConfig
from fulltune.data.formats import Example
from fulltune.data.loader import collate
from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.spec import spec_from_config
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import train_step

SHAPES = {"1.1B": (2048, 5632, 22, 32, 4, 32000), "tiny": (64, 172, 2, 4, 2, 512)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    cuda = not args.cpu_tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = "tiny" if args.cpu_tiny else "1.1B"
    seq = 64 if args.cpu_tiny else args.seq
    from transformers import LlamaConfig, LlamaForCausalLM
    h, i, layers, heads, kv, vocab = SHAPES[name]
    config = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).float()
    D.shard(model, "bf16-mixed", device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    g = torch.Generator().manual_seed(D.rank())
    examples = [Example(torch.randint(3, vocab, (seq,), generator=g).tolist(), [1] * seq) for _ in range(args.batch)]
    batch = collate(examples, 0, device)
    times = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, _ = train_step(model, optimizer, [batch], autocast, 1.0)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        D.is_main() and print(f"step {step + 1}: loss {loss:.4f}, {times[-1]:.2f} s", flush=True)
    steady = times[1:]
    tokens_per_s = args.batch * seq * D.world_size() / (sum(steady) / len(steady))
    setup = TrainSetup(micro_batch=args.batch, seq_len=seq, precision="bf16-mixed", gpus=D.world_size(),
                       zero_stage=3 if D.world_size() > 1 else 0, device="cuda" if cuda else "cpu")
    predicted = estimate(spec_from_config(config, name), setup).peak / GB
    peak = torch.cuda.max_memory_allocated() / GB if cuda else float("nan")
    if D.is_main():
        print(f"{name} LLaMA, FSDP2 over {D.world_size()} rank(s), bf16 MixedPrecisionPolicy, batch {args.batch}×{seq}: "
              f"{tokens_per_s:,.0f} tokens/s (steps 2-{args.steps}), peak allocated {peak:.2f} GB "
              f"(estimator {predicted:.2f} GB incl. CUDA context)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
