r"""Prefix-tree scoring against one sequence per row, on what a quickstart run scores twice (θ0, θ*).

For the task (200 SST-2 reviews × 2 labels, both prompt formats) and each probe of the quickstart
(50 multiple-choice items of ARC-Easy, PIQA and SciQ; 30 HumanEval and MBPP solutions), this
scores the real SmolLM2-135M both ways in the run's compute dtype, eval batch 16, and prints the
tokens each way computes, the seconds, and the largest difference of a summed log-likelihood
(fp32: rounding only). The code probes have one continuation per context: nothing to share.

    .venv/bin/python bench/prefix_tree_scoring.py [--precision fp32|bf16-mixed]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python bench/prefix_tree_scoring.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import cpu_flags, cpu_name


def candidates(tokenizer, test_file: str) -> list:
    from fulltune.assets import resolve_data_path
    from fulltune.data.formats import encode_record

    out = []
    with open(resolve_data_path(test_file)) as fh:
        for line in fh:
            record = json.loads(line)
            for label in ("positive", "negative"):
                msgs = [dict(m) for m in record["messages"]]
                msgs[-1]["content"] = label
                out.append(
                    encode_record(tokenizer, {"messages": msgs}, "messages", loss_on="completion", where=test_file)
                )
    return out


def main() -> None:
    from fulltune.config import ModelConfig
    from fulltune.evals import classify
    from fulltune.evals.prefix_tree import groups, tree_row
    from fulltune.evals.probes import load_probe, probe_examples
    from fulltune.model import load_theta0
    from fulltune.runtime import autocast_factory, resolve_precision

    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    model, tok, _ = load_theta0(ModelConfig(path="default"), verbose=False)
    model.eval()
    autocast = autocast_factory(precision, device)
    sets = {
        "task sst2-short": candidates(tok, "builtin:sst2-short/test"),
        "task sst2": candidates(tok, "builtin:sst2/test"),
    }
    for name, n in (("arc_easy", 50), ("piqa", 50), ("sciq", 50), ("humaneval", 30), ("mbpp", 30)):
        sets[name] = probe_examples(load_probe(name, n), tok)
    real_groups = classify.groups
    print(f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}, precision {precision}\n")
    print(
        "| scored | sequences | rows (tree) | tokens alone | tokens in trees | s alone | s tree | speed-up | max |Δ| |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = [0.0, 0.0]
    for name, examples in sets.items():
        rows = [tree_row(examples, g) for g in groups(examples)]
        seconds, scores = [], []
        for share in (False, True):
            classify.groups = lambda e, share=True, _s=share: real_groups(e, share=_s and share)
            t0 = time.perf_counter()
            scores.append(
                classify.score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=16, autocast=autocast)
            )
            seconds.append(time.perf_counter() - t0)
        classify.groups = real_groups
        totals = [totals[0] + seconds[0], totals[1] + seconds[1]]
        diff = max(abs(a - b) for a, b in zip(*scores))
        print(
            f"| {name} | {len(examples)} | {len(rows)} | {sum(len(e.input_ids) for e in examples):,} | "
            f"{sum(len(r.input_ids) for r in rows):,} | {seconds[0]:.1f} | {seconds[1]:.1f} | "
            f"{seconds[0] / seconds[1]:.2f}× | {diff:.1e} |"
        )
    print(f"\nall: {totals[0]:.1f} s alone, {totals[1]:.1f} s in trees ({totals[0] / totals[1]:.2f}×)")


if __name__ == "__main__":
    main()
