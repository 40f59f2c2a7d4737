"""fulltune vs transformers' Trainer on the quickstart: same model, data, batch, lr, steps.

Each engine runs in its own subprocess (so peak RSS is its own) on the same tokenised SST-2
training sequences (assistant-only labels), micro-batch 8, no accumulation, AdamW (fused),
lr 5e-5 warmup+cosine, grad clip 1.0, bf16 autocast where the CPU has bf16 units, seed 0.
A third row runs fulltune with the LM head applied at every position (as HF does) to show what
projecting only the loss positions buys. Reports useful (non-padding) tokens/s over the training
call, its wall time, peak RSS and the last step's loss, prints a table and appends it to
docs/benchmarks.md.

    .venv/bin/python bench/vs_hf_trainer.py [--steps 30] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "fulltune", "fulltune-full-logits")
COMMON = [
    "data.packing=false",
    "train.micro_batch_size=8",
    "train.grad_accum_steps=1",
    "optim.lr=5e-5",
    "schedule.name=cosine",
    "schedule.warmup_steps=2",
    "data.val_fraction=0",
    "eval.task_file=",
    "train.progress=false",
    "train.seed=0",
]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB


def run_fulltune(steps: int, out: Path, full_logits: bool = False) -> dict:
    from fulltune import loss
    from fulltune.config import load_config
    from fulltune.train import loop, setup

    if full_logits:  # ablation: project every position through the LM head, as HF does
        loss.PLAIN_HEAD_TYPES.clear()

    cfg = load_config(
        ROOT / "configs/quickstart-2026-11.yaml",
        COMMON + [f"train.max_steps={steps}", f"train.output_dir={out}", "train.overwrite=true"],
    )
    run = setup(cfg)
    t0 = time.perf_counter()
    loop(run)
    wall = time.perf_counter() - t0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "engine": "fulltune" + (" (full logits)" if full_logits else ""),
        "useful_tokens": run.state.tokens_seen,
        "wall_s": wall,
        "final_loss": losses[-1],
        "mean_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "precision": run.precision,
    }


def run_hf(steps: int, out: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    from fulltune.config import load_config
    from fulltune.data.loader import collate
    from fulltune.data.rundata import load_task_data, read_sources
    from fulltune.model import load_theta0
    from fulltune.runtime import pick_device, resolve_precision

    cfg = load_config(ROOT / "configs/quickstart-2026-11.yaml", COMMON)
    model, tokenizer, _ = load_theta0(cfg.model)
    examples = load_task_data(cfg, tokenizer, read_sources(cfg)).train
    counted = {"tokens": 0}

    def collator(batch):
        tensors = collate(batch, tokenizer.pad_token_id)  # same padding and labels as fulltune
        counted["tokens"] += int(tensors["attention_mask"].sum())
        return tensors

    bf16 = resolve_precision("auto", pick_device("cpu")) == "bf16-mixed"
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "engine": "HF Trainer",
        "useful_tokens": counted["tokens"],
        "wall_s": wall,
        "final_loss": losses[-1],
        "mean_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "precision": "bf16-mixed" if bf16 else "fp32",
    }


def child(engine: str, steps: int, out: Path) -> None:
    if engine == "hf":
        result = run_hf(steps, out)
    else:
        result = run_fulltune(steps, out, full_logits=engine == "fulltune-full-logits")
    result["tokens_per_s"] = result["useful_tokens"] / result["wall_s"]
    result["peak_rss_gb"] = _peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


def table(rows: list[dict], steps: int) -> str:
    head = (
        f"### fulltune vs HF Trainer — {date.today().isoformat()}, {steps} steps\n\n"
        f"SmolLM2-135M-Instruct, SST-2 quickstart data, micro-batch 8 × 1, lr 5e-5 warmup 2 + cosine, "
        f"fused AdamW, clip 1.0; {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, torch {_torch_version()}.\n"
        f"Command: `.venv/bin/python bench/vs_hf_trainer.py --steps {steps}`\n\n"
        "| engine | precision | useful tokens/s | wall time (s) | peak RSS (GB) | final loss | "
        "mean loss, last 10 steps |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    return head + "".join(
        f"| {r['engine']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | "
        f"{r['final_loss']:.4f} | {r['mean_loss_last10']:.4f} |\n"
        for r in rows
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    ap.add_argument("--child", choices=ENGINES)
    ap.add_argument("--out", default="/tmp/fulltune-bench")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.out) / args.child)
        return
    rows = []
    for engine in ENGINES:
        print(f"[bench] running {engine} for {args.steps} steps ...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--child", engine, "--steps", str(args.steps), "--out", args.out],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"[bench] {engine} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    text = table(rows, args.steps)
    print(text)
    if not args.no_write:
        bench_md = ROOT / "docs" / "benchmarks.md"
        if not bench_md.exists():
            bench_md.write_text(
                "# Benchmarks\n\nMeasured numbers only; each table names the command that produced it.\n\n"
            )
        with open(bench_md, "a") as fh:
            fh.write("\n" + text)
        print(f"[bench] appended to {bench_md}")


if __name__ == "__main__":
    main()
