"""The estimator at 9x the model it was fitted on: a random-init model of Llama-3.2-1B's shape (1.24B
parameters, 128,256-token vocabulary, tied embeddings), 3 steps of one 1,024-token sequence on this
CPU in each memory mode; the run's own [memory] check, predicted against measured peak, and the model
state in bytes per parameter (parameters + gradients + optimiser state, measured).

The default mode needs ~21 GB (16 B/param + activations): run it alone on a 24 GB machine.

    .venv/bin/python bench/scale_check.py [--modes lean floor default] [--steps 3]

Results: bench/results/scale_check.json (one entry per mode, kept across invocations).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ROOT, cpu_flags, cpu_name
from memory_accuracy import TINY, make_llama, make_text, run_one, text_source

# Llama-3.2-1B's config.json, less the weights (SmolLM2's token ids fit its vocabulary).
SHAPE = {
    **TINY,
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rope_theta": 500000.0,
}
RESULTS = ROOT / "bench" / "results" / "scale_check.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["lean", "floor"], choices=["default", "lean", "floor"])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    default_dir, tokenizer, reviews = text_source()
    kept = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}}
    kept.update(cpu=cpu_name(), flags=cpu_flags(), shape=SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_llama(tmp / "llama-1b", default_dir, SHAPE)
        data = make_text(tmp / "text-1024.jsonl", 1024, tokenizer, reviews, n=8)
        for mode in args.modes:
            extra = ["data.max_seq_len=1024", "train.micro_batch_size=1", f"train.memory={mode}"]
            extra += ["eval.probes=[]", "eval.drift=false", "train.save_interval=0", "train.tensorboard=false"]
            print(f"[scale] {mode} ...", flush=True)
            memory = run_one(f"1B {mode}", str(model), str(data), extra, tmp / mode, args.steps)
            state = json.loads((tmp / mode / "results.json").read_text()).get("state_memory") or {}
            memory["state"] = state
            kept["rows"][mode] = memory
            print(
                f"[scale]   predicted {memory['predicted_peak_gb']:.2f} GB, measured "
                f"{memory['measured_peak_gb']:.2f} GB ({memory['error_pct']:+.1f}%)",
                flush=True,
            )
            RESULTS.write_text(json.dumps(kept, indent=1) + "\n")


if __name__ == "__main__":
    main()
