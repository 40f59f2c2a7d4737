"""Peak memory of one optimiser step's temporaries on SmolLM2-135M, against the estimator's
"optimizer step temporaries" (B per value × the largest tensor): in pure bf16 with the stochastic
rounding around the step (optim/rounding.py: SGD with momentum, Adafactor, Muon; ROUNDED_STEP_BYTES),
and the low-bit AdamW's step (LOW_BIT_STEP_BYTES: 8-bit, and 4-bit on fp32 and on bf16 weights).

Each optimiser in its own process: θ0 in the precision's weights, a gradient of ones on every weight, two steps
(the first creates the state), RSS sampled every 2 ms around the second step (glibc in its
returning mode, as the runs measure), minus the RSS just before it. Writes
bench/results/rounded_step_memory.json.

    .venv/bin/python bench/rounded_step_memory.py [LABEL ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, bench_env, cpu_flags, cpu_name  # noqa: E402

# label: (optim.name, momentum, train.precision)
CASES = {
    "sgd-momentum": ("sgd", 0.9, "bf16"),
    "adafactor": ("adafactor", 0.0, "bf16"),
    "muon": ("muon", 0.0, "bf16"),
    "adamw8bit": ("adamw8bit", 0.0, "fp32"),
    "adamw4bit": ("adamw4bit", 0.0, "fp32"),
    "adamw4bit bf16": ("adamw4bit", 0.0, "bf16"),
    "floor": ("apollo_mini", 0.0, "bf16"),  # train.memory=floor: the embedding projected too
}
CHILD = """
import json, sys, torch
from fulltune.config import ModelConfig, OptimConfig
from fulltune.memory.measure import PeakMeter
from fulltune.model import load_theta0
from fulltune.optim.param_groups import build_optimizer
name, momentum, precision = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model = load_theta0(ModelConfig(path="default"), verbose=False)[0]
model = model.to(torch.bfloat16) if precision == "bf16" else model.float()
floor = sys.argv[4] == "floor"
opt = build_optimizer(model, OptimConfig(name=name, lr=1e-5, momentum=momentum, project_embeddings=floor), precision)
for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
meter = PeakMeter("cpu").start()
with meter.section("step"):
    opt.step()
meter.stop()
print(json.dumps({"above_bytes": meter.above_baseline("step")}))
"""


def main() -> None:
    from fulltune.memory.estimate import LOW_BIT_STEP_BYTES, ROUNDED_STEP_BYTES, _matrix_shapes
    from fulltune.memory.spec import load_spec

    largest = max(r * c for r, c in _matrix_shapes(load_spec("smollm2-135m")))
    rows = []
    only = sys.argv[1:] or list(CASES)  # labels to measure (default: all)
    for label, (name, momentum, precision) in ((k, v) for k, v in CASES.items() if k in only):
        argv = [sys.executable, "-c", CHILD, name, str(momentum), precision, label]
        out = subprocess.run(argv, env=bench_env(), cwd=ROOT, capture_output=True, text=True, check=True).stdout
        above = json.loads(out.strip().splitlines()[-1])["above_bytes"]
        estimated = ROUNDED_STEP_BYTES.get(label) or ROUNDED_STEP_BYTES.get(name) or LOW_BIT_STEP_BYTES[name]
        rows.append({"optimizer": label, "measured_B_per_value": above / largest, "estimated_B_per_value": estimated,
                     "precision": precision, "above_bytes": above})  # fmt: skip
    print(f"{cpu_name()} ({' '.join(cpu_flags())}); largest tensor {largest:,} values\n")
    print("| optimiser | step peak above before, measured | B per value of the largest | estimated |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['optimizer']} | {r['above_bytes'] / 1e6:.0f} MB | {r['measured_B_per_value']:.1f} "
              f"| {r['estimated_B_per_value']} |")  # fmt: skip
    out = {"cpu": cpu_name(), "flags": cpu_flags(), "largest_values": largest, "rows": rows}
    path = ROOT / "bench" / "results" / "rounded_step_memory.json"
    if path.exists():  # a subset replaces its own rows and keeps the others
        kept = [r for r in json.loads(path.read_text())["rows"] if r["optimizer"] not in only]
        out["rows"] = [r for r in kept + rows if r["optimizer"] in CASES]
        out["rows"].sort(key=lambda r: list(CASES).index(r["optimizer"]))
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
