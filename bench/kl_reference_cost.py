"""What β·KL(θ0 ‖ θ) costs per step with a live θ0 copy and with θ0's cached top-k (loss.kl_reference),
and how much of the live KL the cache sees, on SmolLM2-135M (the embedded default).

One thread, fp32, AdamW, one micro-batch: the quickstart's first 4 packed rows (configs/quickstart.yaml:
~4.6 reviews a 256-token row, loss on the answers); each variant takes the same 6 steps from θ0 (the
first is warm-up), median CPU time per step; CE is measured first and last (the spread is the noise).
The KL's size is compared after those steps (θ has moved). Prints a markdown table and writes
bench/results/kl_reference_cost.json.

    .venv/bin/python bench/kl_reference_cost.py
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_flags, cpu_name, print_table, save_results  # noqa: E402

from fulltune import kl_reference  # noqa: E402
from fulltune.config import (  # noqa: E402
    LossConfig,
    ModelConfig,  # noqa: E402
    OptimConfig,
)
from fulltune.data.formats import Example  # noqa: E402
from fulltune.data.loader import collate  # noqa: E402
from fulltune.evals import drift  # noqa: E402
from fulltune.loss import Objective, objective_for_run  # noqa: E402
from fulltune.model import load_theta0  # noqa: E402
from fulltune.optim.param_groups import build_optimizer  # noqa: E402
from fulltune.train import train_step  # noqa: E402

STEPS, BETA = 6, 0.1


def examples(tokenizer) -> list[Example]:
    from fulltune.config import load_config
    from fulltune.data.rundata import load_task_data, read_sources

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["eval.probes=[]", "eval.task_file="])
    return load_task_data(cfg, tokenizer, read_sources(cfg)).train[:4]


def run(variant: str) -> dict:
    model, tokenizer, _ = load_theta0(ModelConfig(path="default"))
    rows = examples(tokenizer)
    batch = collate(rows, pad_id=0)
    started = time.process_time()
    if variant.startswith("ce"):
        objective = Objective()
    elif variant == "live":
        objective = objective_for_run(LossConfig(kl_to_theta0=BETA), model)
    else:
        ref = drift.build_reference(model, rows, autocast=contextlib.nullcontext, batch_size=4, k=kl_reference.K)
        objective = Objective("ce", BETA, cached=kl_reference.CachedKL.of(ref, rows))
    setup_s = time.process_time() - started
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    times = []
    for _ in range(STEPS):
        t = time.process_time()
        train_step(model, opt, [batch], contextlib.nullcontext, grad_clip=1.0, objective=objective)
        times.append(time.process_time() - t)
    kl = {}
    if not variant.startswith("ce"):
        live = objective_for_run(LossConfig(kl_to_theta0=BETA), load_theta0(ModelConfig(path="default"))[0])
        kl = {"kl_live": live.sums(model, batch).kl, "kl_this": objective.sums(model, batch).kl}
    extra = (
        objective.theta0_nbytes if variant == "live" else (objective.cached.ref.nbytes if variant == "cached" else 0)
    )
    return {"variant": variant, "step_s": statistics.median(times[1:]), "setup_s": setup_s, "extra_bytes": extra, **kl}


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(v) for v in ("ce", "live", "cached", "ce again")]
    base = (rows[0]["step_s"] + rows[-1]["step_s"]) / 2
    print(f"{cpu_name()} ({' '.join(cpu_flags())}), 1 thread, torch {torch.__version__}\n")
    lines = [
        [r["variant"], f"{r['step_s']:.2f}", f"{r['step_s'] / base - 1:+.0%}", f"{r['setup_s']:.1f}",
         f"{r['extra_bytes'] / 1e6:.1f} MB", f"{r['kl_this'] / r['kl_live']:.3f}" if "kl_live" in r else "–"]
        for r in rows
    ]  # fmt: skip
    head = ["β·KL from", "CPU s / step", "vs CE (mean of both)", "set-up s", "memory beyond CE", "KL seen / live KL"]
    print_table(head, "lrrrrr", lines)
    save_results("kl_reference_cost", rows, threads=1)


if __name__ == "__main__":
    main()
