"""Why torchao's low-bit AdamW step is slow on CPU: the step alone, timed and profiled.

On SmolLM2-135M's parameter shapes (random-init model, gradients of 1e-3-scale noise), in one
thread: times `optimizer.step()` for fused AdamW, torchao's AdamW8bit and AdamW4bit, and the 4-bit
AdamW that `optim.name=adamw4bit` builds (torchao's state, optim/lowbit_cpu.py's CPU kernel), on
fp32 weights and on bf16 weights (lean's), the first step (compile) apart from the median of the
next ones; then profiles one steady low-bit step and sums the operators' own CPU time by kind:
inductor's compiled kernels, dynamo's cache lookup and guards, the rest.

    .venv/bin/python bench/lowbit_step.py [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import cpu_flags, save_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fulltune.assets import ensure_model

    config = AutoConfig.from_pretrained(ensure_model())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    out = [p for p in model.parameters() if p.requires_grad]
    for p in out:
        p.grad = torch.randn_like(p) * 1e-3
    return out


def build(name: str, ps: list, dtype: torch.dtype) -> torch.optim.Optimizer:
    import torchao.optim as ao

    from fulltune.config import OptimConfig
    from fulltune.optim.optimizers import optimizer_class

    if name == "adamw":
        return torch.optim.AdamW(ps, lr=1e-4, fused=True)
    if name == "fulltune-adamw4bit":  # what optim.name=adamw4bit builds (optim/lowbit_cpu.py on CPU)
        cls, kwargs = optimizer_class(
            OptimConfig(name="adamw4bit", lr=1e-4), "bf16" if dtype == torch.bfloat16 else "fp32"
        )
        return cls(ps, **kwargs)
    cls = {"torchao-adamw8bit": ao.AdamW8bit, "torchao-adamw4bit": ao.AdamW4bit}[name]
    return cls(ps, lr=1e-4, bf16_stochastic_round=dtype == torch.bfloat16)


def time_steps(opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:])


KINDS = [  # first match wins, on the operator's name (inductor's kernels run as "## Call CompiledFxGraph ...")
    ("compiled kernels", ("CompiledFxGraph", "cpp_fused")),
    ("dynamo lookup + guards", ("Torch-Compiled Region", "TorchDynamo", "guard")),
]


def profile_kinds(opt: torch.optim.Optimizer) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    kinds: dict[str, float] = defaultdict(float)
    top = []
    for e in prof.key_averages():
        kind = next((k for k, frags in KINDS if any(f in e.key for f in frags)), "rest")
        kinds[kind] += e.self_cpu_time_total / 1e6
        top.append((e.self_cpu_time_total / 1e6, e.key, e.count))
    top.sort(reverse=True)
    for s, key, n in top[:12]:
        print(f"[lowbit]   {s:7.3f} s  ×{n:<5} {key[:90]}", flush=True)
    return dict(kinds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, dtype in (
        ("adamw", torch.float32),
        ("torchao-adamw8bit", torch.float32),
        ("torchao-adamw4bit", torch.float32),
        ("fulltune-adamw4bit", torch.float32),
        ("torchao-adamw4bit", torch.bfloat16),
        ("fulltune-adamw4bit", torch.bfloat16),
    ):
        ps = params(dtype)
        opt = build(name, ps, dtype)
        first, steady = time_steps(opt, args.steps)
        n = sum(p.numel() for p in ps)
        row = {
            "optimizer": name,
            "weights": str(dtype).removeprefix("torch."),
            "first_s": first,
            "steady_s": steady,
            "ns_per_value": 1e9 * steady / n,
        }
        print(
            f"[lowbit] {name} {row['weights']}: first {first:.2f} s, steady {steady:.3f} s "
            f"({row['ns_per_value']:.1f} ns/value)",
            flush=True,
        )
        if name != "adamw":
            row["profile_s"] = profile_kinds(opt)
            print(f"[lowbit]   by kind: {row['profile_s']}", flush=True)
        rows.append(row)
    save_results("lowbit_step", rows, threads=1, torch=torch.__version__)
    print(f"[lowbit] wrote bench/results/lowbit_step.json ({' '.join(cpu_flags())})")


if __name__ == "__main__":
    main()
