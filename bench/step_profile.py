"""Where a training step's time goes: torch.profiler over quickstart steps, grouped by kind of work.

Builds the run exactly as `fulltune train` does (configs/quickstart-2026-11.yaml, packed rows of 256,
micro-batch 8 rows, no evaluation), takes 3 warm-up steps, then profiles 2 steps and sums each
operator's own CPU time into: matmuls (aten::mm/addmm/bmm), attention (SDPA kernels), dtype casts
(autocast's weight and gradient copies), elementwise and reductions (norms, rotary, SiLU, adds;
inductor's fused kernels when compiled), zero fills (the dense embedding / LM-head gradients among
them), the optimiser and clipping, and the rest. The shares say what a faster step would have to
remove; the profiler's own overhead makes the step ~5% slower.

    .venv/bin/python bench/step_profile.py [key=value ...]      e.g. train.precision=fp32 train.compile=true
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from common import OLD_QUICKSTART, cpu_flags, cpu_name
from torch.profiler import ProfilerActivity, profile

KINDS = [  # (kind, operator name fragments), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("dtype casts", ("aten::copy_", "aten::_to_copy")),
    ("optimiser + clipping", ("adamw", "foreach", "linalg_vector_norm", "clip")),
    ("zero fills", ("aten::fill_", "aten::zero_")),
    (
        "elementwise + reductions",
        (
            "aten::mul",
            "aten::add",
            "aten::silu",
            "aten::pow",
            "aten::rsqrt",
            "aten::mean",
            "aten::sum",
            "aten::neg",
            "aten::cat",
            "aten::div",
            "aten::where",
            "softmax",
            "aten::index",
            "aten::embedding",
            "cpp_fused",
            "CompiledFxGraph",
        ),
    ),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p.lower() in low for p in parts)), "other")


def main() -> None:
    from fulltune import train as T
    from fulltune.config import load_config
    from fulltune.throughput import targets

    over = [
        "train.output_dir=/tmp/fulltune-step-profile",
        "train.overwrite=true",
        "train.progress=false",
        "eval.task_file=",
        "eval.probes=[]",
        "train.memory_steps=0",
        "train.peak_probe_s=0",
        "data.val_fraction=0",
        "data.packing=true",
        *sys.argv[1:],
    ]
    run = T.setup(load_config(OLD_QUICKSTART, over))

    def step() -> float:
        flat, batches = T._next_step(run)
        t0 = time.perf_counter()
        T.train_step(
            run.model,
            run.optimizer,
            batches,
            run.autocast,
            grad_clip=run.cfg.optim.grad_clip,
            n_targets=targets(run.examples(flat)),
        )
        return time.perf_counter() - t0

    warm = [step() for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed = [step(), step()]
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    print(f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}; precision {run.precision}, overrides {sys.argv[1:]}")
    print(
        f"warm-up steps {', '.join(f'{s:.2f}' for s in warm)} s; "
        f"profiled steps {', '.join(f'{s:.2f}' for s in timed)} s\n"
    )
    print("| kind of work | s per step | share |\n| --- | ---: | ---: |")
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds / 2:.2f} | {100 * seconds / whole:.0f}% |")
    print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
