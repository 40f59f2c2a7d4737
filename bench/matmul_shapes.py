r"""How fast this CPU multiplies the matrices of a SmolLM2-135M training step, shape by shape.

MFU divides by one number, the matmul peak the run measures at its start (throughput.py: the MLP's
up-projection, X[M×576] @ W[576×1536]). A training step multiplies every weight three ways — the
forward X·Wᵀ, the input gradient dY·W and the weight gradient dYᵀ·X — and its shapes include the
narrow k/v projections (576 → 192). This times each of them, M = 1,900 and 3,800 tokens (one and
two quickstart micro-batches of packed rows), in bf16 and fp32, and prints the rate each reaches and
the step's matmul-only ceiling: the step's matmul FLOPs over the time these kernels need for them,
as a share of the measured peak. No non-matmul work is counted, so real MFU is below it. Each rate
is the best of repeated calls for ~0.4 s. Without bf16 units (or capped below them) only fp32 runs.

    .venv/bin/python bench/matmul_shapes.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python bench/matmul_shapes.py
"""

from __future__ import annotations

import time

import torch
from common import cpu_flags, cpu_name

# SmolLM2-135M's per-layer weights as (in, out, how many per layer): q and o 576→576, k and v 576→192,
# gate and up 576→1536, down 1536→576.
SHAPES = [(576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1)]


def rate(fn, flops: float, seconds: float = 0.4) -> float:
    fn()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def main() -> None:
    from fulltune.runtime import cpu_has_bf16_units
    from fulltune.throughput import matmul_peak

    print(
        f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| dtype | M | weight (in→out) | forward X·Wᵀ | input grad dY·W | weight grad dYᵀ·X |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    ceilings = []
    for dtype in (
        (torch.bfloat16, torch.float32) if cpu_has_bf16_units() else (torch.float32,)
    ):  # no units: bf16 is software
        peak = matmul_peak(torch.device("cpu"), dtype, rows=2048, hidden=576, inner=1536)
        for m in (1900, 3800):
            flops = seconds = 0.0
            for k, n, count in SHAPES:
                x, w, dy = (
                    torch.randn(m, k, dtype=dtype),
                    torch.randn(n, k, dtype=dtype),
                    torch.randn(m, n, dtype=dtype),
                )
                f = 2.0 * m * k * n
                rates = [
                    rate(lambda x=x, w=w: x @ w.t(), f),
                    rate(lambda dy=dy, w=w: dy @ w, f),
                    rate(lambda dy=dy, x=x: dy.t() @ x, f),
                ]
                flops += 3 * f * count
                seconds += sum(f / r for r in rates) * count
                print(
                    f"| {str(dtype).removeprefix('torch.')} | {m} | {k}→{n} | "
                    + " | ".join(f"{r / 1e12:.2f} TFLOP/s" for r in rates)
                    + " |"
                )
            ceilings.append((dtype, m, peak, flops / seconds))
    print("\n| dtype | M | measured peak (run's probe) | all of a step's matmuls | matmul-only MFU ceiling |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dtype, m, peak, achieved in ceilings:
        print(
            f"| {str(dtype).removeprefix('torch.')} | {m} | {peak / 1e12:.2f} TFLOP/s | "
            f"{achieved / 1e12:.2f} TFLOP/s | {100 * achieved / peak:.0f}% |"
        )


if __name__ == "__main__":
    main()
