"""Run the general-skill probes on a model, and report what fine-tuning cost next to what it gained."""

from __future__ import annotations

import math
import time

from fulltune.evals.classify import score_sequences
from fulltune.evals.probes import Probe, load_probe, probe_examples, summarise


class ProbeSet:
    """Probes loaded and tokenised once; `run(model)` scores them all."""

    def __init__(self, names: list[str], tokenizer, mc_items: int, code_items: int, max_len: int = 2048):
        self.probes: list[Probe] = []
        for name in names:
            n = code_items if name in ("humaneval", "mbpp") or name.startswith("text:") else mc_items
            self.probes.append(load_probe(name, n))
        self.examples = {p.name: probe_examples(p, tokenizer, max_len) for p in self.probes}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(self, model, autocast, batch_size: int = 16, progress: bool = False) -> dict:
        out = {}
        start = time.perf_counter()
        for probe in self.probes:
            examples = self.examples[probe.name]
            scores = score_sequences(
                model,
                examples,
                pad_id=self.pad_id,
                batch_size=batch_size,
                autocast=autocast,
                desc=f"probe {probe.name}" if progress else "",
            )
            out[probe.name] = summarise(probe, examples, scores)
        out["_seconds"] = time.perf_counter() - start
        return out


def headline(summary: dict) -> tuple[str, float]:
    """The probe's main number: accuracy for multiple choice, NLL per token for text."""
    return ("acc", summary["acc"]) if summary["kind"] == "mc" else ("nll_per_token", summary["nll_per_token"])


def gain(row: dict) -> tuple[float, float]:
    """A forgetting-report row's change in the units budgets use, up = better: accuracy points, or
    −% of θ0's NLL per token; with the standard error of the difference in the same units."""
    scale = 100.0 if row["metric"] == "acc" else -100.0 / abs(row["before"])
    err = abs(scale) * math.hypot(row.get("stderr_before") or 0.0, row.get("stderr_after") or 0.0)
    return scale * row["change"], err


def forgetting_report(before: dict, after: dict, task: dict | None = None) -> dict:
    """Per probe: before, after, change, retention (accuracies) or relative change (NLL), standard errors."""
    rows = {}
    for name, b in before.items():
        if name.startswith("_") or name not in after:
            continue
        a = after[name]
        if b["kind"] == "mc":
            rows[name] = {
                "metric": "acc",
                "before": b["acc"],
                "after": a["acc"],
                "change": a["acc"] - b["acc"],
                "retention": a["acc"] / b["acc"] if b["acc"] else None,
                "stderr_before": b["acc_stderr"],
                "stderr_after": a["acc_stderr"],
                "n": b["n"],
            }
        else:
            rows[name] = {
                "metric": "nll_per_token",
                "before": b["nll_per_token"],
                "after": a["nll_per_token"],
                "change": a["nll_per_token"] - b["nll_per_token"],
                "relative_change": a["nll_per_token"] / b["nll_per_token"] - 1,
                "bits_per_byte_before": b["bits_per_byte"],
                "bits_per_byte_after": a["bits_per_byte"],
                "n": b["n"],
            }
    report = {"probes": rows}
    if task:
        report["task"] = task
    return report


def render_report(report: dict) -> str:
    lines = ["[forgetting] general skills, θ0 → fine-tuned:"]
    for name, r in report["probes"].items():
        if r["metric"] == "acc":
            retention = "n/a" if r["retention"] is None else f"{r['retention']:.3f}"
            lines.append(
                f"  {name:<12} acc {100 * r['before']:5.1f}% → {100 * r['after']:5.1f}% "
                f"({100 * r['change']:+.1f} points, retention {retention}, "
                f"s.e. ±{100 * r['stderr_after']:.1f}, n={r['n']})"
            )
        else:
            lines.append(
                f"  {name:<12} NLL/token {r['before']:.3f} → {r['after']:.3f} ({100 * r['relative_change']:+.1f}%), "
                f"bits/byte {r['bits_per_byte_before']:.3f} → {r['bits_per_byte_after']:.3f}, n={r['n']}"
            )
    if "task" in report:
        t = report["task"]
        lines.append(
            f"  {'task':<12} acc {100 * t['before']:5.1f}% → {100 * t['after']:5.1f}% "
            f"({100 * (t['after'] - t['before']):+.1f} points): what was learned"
        )
    return "\n".join(lines)
