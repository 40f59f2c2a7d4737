"""The GPU check's helpers (bench/gpu_check.sh runs them; nothing here has been run on a GPU yet).

python bench/gpu_check.py carry DIR      (here, on CPU) SST-2 and the default model's config and
                                         tokenizer (no weights: 3.5 MB) into DIR, to travel to a
                                         GPU machine that cannot download anything
python bench/gpu_check.py models DIR     (there) HF directories under DIR: `small` — the default's
                                         weights if present, else a seeded random init of its shape;
                                         `large` — a random-init SmolLM2-1.7B-shaped Llama (24 × 2048)
python bench/gpu_check.py report DIR     the three runs' numbers as a markdown table, and the checks
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def carry(dest: Path) -> None:
    from fulltune.assets import home

    src = home()
    (dest / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "data" / "sst2", dest / "data" / "sst2", dirs_exist_ok=True)
    model = src / "models" / "SmolLM2-135M-Instruct"
    (dest / "config").mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / "config" / f.name)
    print(f"carry: {dest} ({sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def models(dest: Path, carried: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fulltune.assets import home

    cached = home() / "models" / "SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(cached if (cached / "model.safetensors").exists() else carried / "config")
    if (cached / "model.safetensors").exists():
        shutil.copytree(cached, dest / "small", dirs_exist_ok=True)
    else:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(carried / "config")).save_pretrained(dest / "small")
        tokenizer.save_pretrained(dest / "small")
    large = AutoConfig.from_pretrained(carried / "config" if (carried / "config").exists() else cached)
    large.update(
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=8192,
        )
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(large).save_pretrained(dest / "large")
    tokenizer.save_pretrained(dest / "large")


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def report(out: Path) -> int:
    one, fsdp1 = _steps(out / "one"), _steps(out / "torchrun1")
    gaps = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, fsdp1)]
    ok = len(one) == len(fsdp1) > 0 and max(gaps) < 1e-3
    print(
        f"one process vs torchrun 1 rank (FSDP2 over NCCL): {len(one)} / {len(fsdp1)} steps, "
        f"largest relative loss gap {max(gaps):.2e} → {'OK' if ok else 'FAIL'}"
    )
    rows = [
        "| run | useful tok/s | MFU | padding | CUDA peak measured | predicted | s/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("one", "torchrun1", "large"):
        steps = _steps(out / name)[3:] or _steps(out / name)
        mem = json.loads((out / name / "results.json").read_text()).get("memory", {})
        mid = sorted(steps, key=lambda r: r["tokens_per_s"])[len(steps) // 2]
        rows.append(
            f"| {name} | {mid['tokens_per_s']:.0f} | {100 * mid.get('mfu', 0):.1f}% | "
            f"{100 * mid['padding_fraction']:.1f}% | {mem.get('measured_peak_gb', float('nan')):.2f} GB | "
            f"{mem.get('predicted_peak_gb', float('nan')):.2f} GB | "
            f"{mid['tokens_per_s'] and mid['tokens_seen'] / len(_steps(out / name)) / mid['tokens_per_s']:.2f} |"
        )
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    verb, where = sys.argv[1], Path(sys.argv[2])
    if verb == "carry":
        carry(where)
    elif verb == "models":
        models(where, Path(sys.argv[3]) if len(sys.argv) > 3 else where)
    else:
        sys.exit(report(where))
