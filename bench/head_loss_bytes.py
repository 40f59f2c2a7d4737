"""Peak bytes of the LM head + cross-entropy + backward per (position with loss × vocabulary).

The estimator's `logits + loss` term uses this constant. Measures the CPU peak (honest-malloc RSS)
of F.linear → .float() → cross_entropy(reduction="none") → backward for 2048 positions and a
49,152-word vocabulary, minus the head's weight gradient and its bf16 copy (counted elsewhere).

    .venv/bin/python bench/head_loss_bytes.py amp|fp32
"""

import contextlib
import sys

import torch
import torch.nn.functional as F

from fulltune.memory.measure import PeakMeter

N, V, h = 2048, 49152, 256
amp = sys.argv[1] == "amp"
w = torch.randn(V, h, requires_grad=True)
x = torch.randn(N, h, requires_grad=True)
t = torch.randint(0, V, (N,))


def f():
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        logits = F.linear(x, w)
    return -F.cross_entropy(logits.float(), t, reduction="none")


for _i in range(2):
    m = PeakMeter("cpu").start()
    with m.section("s"):
        logp = f()
        (-logp.sum()).backward()
        del logp
    m.stop()
    extra = V * h * 4 + (V * h * 2 if amp else 0)
    print(sys.argv[1], "peak bytes per N·V (minus w.grad and bf16 w):", (m.above_baseline("s") - extra) / (N * V))
    w.grad = None
    x.grad = None
