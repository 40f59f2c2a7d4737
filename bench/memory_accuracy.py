"""Predicted vs measured peak memory of real fulltune runs on this CPU, in several configurations.

Each configuration trains a few steps in its own process (`fulltune train`), on fixed-length
text sequences (so every micro-batch has the same shape) or on the quickstart's SFT data, and
reads `results.json` → memory: the estimator's peak for the largest micro-batch vs the peak RSS
above the pre-model baseline (2 ms sampling, glibc told to return freed memory at once).
Writes a table to docs/memory.md between the BENCH markers.

    .venv/bin/python bench/memory_accuracy.py [--steps 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULLTUNE = [sys.executable, "-m", "fulltune"]

# (label, model, overrides): model "135m" is SmolLM2-135M, "tiny" a random-init 8-layer Llama
# with SmolLM2's vocabulary; "text:S" is fixed-length text of S tokens, "sft" the quickstart data.
CONFIGS = [
    ("135M bf16-mixed AdamW b4×256", "135m", "text:256", ["train.micro_batch_size=4"]),
    ("135M fp32 AdamW b4×256", "135m", "text:256", ["train.micro_batch_size=4", "train.precision=fp32"]),
    (
        "135M bf16-mixed AdamW b8×512 ckpt",
        "135m",
        "text:512",
        ["train.micro_batch_size=8", "model.activation_checkpointing=true"],
    ),
    ("135M bf16-mixed SGD b4×256", "135m", "text:256", ["train.micro_batch_size=4", "optim.name=sgd"]),
    (
        "135M bf16-mixed SGD-mom b2×1024",
        "135m",
        "text:1024",
        ["train.micro_batch_size=2", "optim.name=sgd", "optim.momentum=0.9"],
    ),
    ("135M bf16-mixed AdamW b8 SST-2 SFT", "135m", "sft", ["train.micro_batch_size=8"]),
    ("tiny bf16-mixed AdamW b8×512", "tiny", "text:512", ["train.micro_batch_size=8"]),
    (
        "tiny fp32 AdamW b16×256 ckpt",
        "tiny",
        "text:256",
        ["train.micro_batch_size=16", "train.precision=fp32", "model.activation_checkpointing=true"],
    ),
]


# the "tiny" model: an 8-layer Llama with SmolLM2's vocabulary
TINY = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def make_llama(folder: Path, default_dir: Path, shape: dict) -> Path:
    """A random-init (seed 0) Llama of `shape`, with SmolLM2's tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(folder)
    return folder


def text_source():
    """The default model's directory and tokenizer, and SST-2's training reviews (make_text's material)."""
    from transformers import AutoTokenizer

    from fulltune.assets import ensure_model, ensure_sst2

    default_dir, sst2 = ensure_model(), ensure_sst2()
    reviews = [
        json.loads(line)["messages"][0]["content"].split("Review: ")[1].split("\n")[0]
        for line in (sst2 / "train.jsonl").read_text().splitlines()
    ]
    return default_dir, AutoTokenizer.from_pretrained(default_dir), reviews


def make_text(path: Path, tokens: int, tokenizer, reviews: list[str], n: int = 64) -> Path:
    """n records of at least `tokens` tokens each, made by joining SST-2 reviews."""
    rows, i = [], 0
    for _ in range(n):
        text = ""
        while len(tokenizer(text)["input_ids"]) < tokens + 8:
            text += reviews[i % len(reviews)] + " "
            i += 1
        rows.append(json.dumps({"text": text}))
    path.write_text("\n".join(rows) + "\n")
    return path


def run_one(label: str, model: str, data: str, extra: list[str], out: Path, steps: int) -> dict:
    cmd = FULLTUNE + [
        "train",
        str(ROOT / "configs/quickstart.yaml"),
        f"model.path={model}",
        f"data.train={data}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "eval.task_file=",
        "data.val_fraction=0",
        "train.progress=false",
        "train.overwrite=true",
        "data.overlong=truncate",
        "data.packing=false",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"[bench] {label} failed:\n{proc.stderr[-3000:]}")
    memory = json.loads((out / "results.json").read_text())["memory"]
    memory["label"] = label
    return memory


def table(rows: list[dict], steps: int) -> str:
    lines = [
        f"Command: `.venv/bin/python bench/memory_accuracy.py --steps {steps}` ({os.cpu_count()} CPU cores, "
        f"{steps} steps per configuration).",
        "",
        "| configuration | largest micro-batch | predicted (GB) | measured (GB) | error |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lb = r["largest_micro_batch"]
        lines.append(
            f"| {r['label']} | {lb['rows']}×{lb['length']} ({lb['targets']} loss tokens) | "
            f"{r['predicted_peak_gb']:.2f} | {r['measured_peak_gb']:.2f} | {r['error_pct']:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def write_doc(text: str) -> None:
    doc = ROOT / "docs" / "memory.md"
    body = doc.read_text()
    start, end = "<!-- BENCH:memory_accuracy -->", "<!-- /BENCH:memory_accuracy -->"
    before, rest = body.split(start)
    after = rest.split(end)[1]
    doc.write_text(f"{before}{start}\n{text}{end}{after}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    args = ap.parse_args()
    default_dir, tokenizer, reviews = text_source()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"135m": str(default_dir), "tiny": str(make_llama(tmp / "tiny", default_dir, TINY))}
        for index, (label, model, data, extra) in enumerate(CONFIGS):
            if args.only and index not in args.only:
                continue
            data_arg, seq = "builtin:sst2/train", []
            if data.startswith("text:"):
                length = int(data.split(":")[1])
                path = tmp / f"text-{length}.jsonl"
                if not path.exists():
                    make_text(path, length, tokenizer, reviews)
                data_arg, seq = str(path), [f"data.max_seq_len={length}"]
            print(f"[bench] {label} ...", flush=True)
            rows.append(run_one(label, models[model], data_arg, seq + extra, tmp / f"run{index}", args.steps))
            print(
                f"[bench]   predicted {rows[-1]['predicted_peak_gb']:.2f} GB, measured "
                f"{rows[-1]['measured_peak_gb']:.2f} GB ({rows[-1]['error_pct']:+.1f}%)",
                flush=True,
            )
    text = table(rows, args.steps)
    print(text)
    if not args.no_write:
        write_doc(text)
        print("[bench] wrote docs/memory.md")


if __name__ == "__main__":
    main()
