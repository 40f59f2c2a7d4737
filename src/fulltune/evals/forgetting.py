"""Run the general-skill probes on a model, and report what fine-tuning cost next to what it gained."""

from __future__ import annotations

import time

from fulltune.evals.classify import score_sequences
from fulltune.evals.paired import accuracy_change, mean_change, nll_change
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
        self.tokenizer = tokenizer  # lmeval:TASK probes hand it to lm-eval

    def run(self, model, autocast, batch_size: int = 16, progress: bool = False) -> dict:
        out = {}
        start = time.perf_counter()
        for probe in self.probes:
            began, examples = time.perf_counter(), self.examples[probe.name]
            if probe.harness:  # lmeval:TASK: lm-evaluation-harness scores each choice
                from fulltune.evals.lmeval import candidate_logliks

                scores = candidate_logliks(model, self.tokenizer, probe.items, batch_size=batch_size, autocast=autocast)
            else:
                scores = score_sequences(
                    model,
                    examples,
                    pad_id=self.pad_id,
                    batch_size=batch_size,
                    autocast=autocast,
                    desc=f"probe {probe.name}" if progress else "",
                )
            out[probe.name] = summarise(probe, examples, scores)
            out[probe.name]["seconds"] = time.perf_counter() - began
        out["_seconds"] = time.perf_counter() - start
        return out

    def fingerprint(self) -> list:
        """What is scored, for a cache key: each probe's name, kind and items."""
        return [[p.name, p.kind, p.items] for p in self.probes]


def headline(summary: dict) -> tuple[str, float]:
    """The probe's main number: accuracy for multiple choice, NLL per token for text."""
    return ("acc", summary["acc"]) if summary["kind"] == "mc" else ("nll_per_token", summary["nll_per_token"])


def gain(row: dict) -> tuple[float, tuple[float, float] | None]:
    """A forgetting-report row's change in the units budgets use, up = better: accuracy points, or
    −% of θ0's NLL; with its paired 95 % interval in the same units (None for rows written before
    per-item records, whose `change` was a fraction or an NLL difference)."""
    if "unit" not in row:  # results.json from before 2026-12-07
        scale = 100.0 if row["metric"] == "acc" else -100.0 / abs(row["before"])
        return scale * row["change"], None
    ci = row.get("ci95")
    if row["unit"] == "points":
        return row["change"], (tuple(ci) if ci else None)
    return -row["change"], ((-ci[1], -ci[0]) if ci else None)


def paired(kind: str, before: dict | None, after: dict | None) -> dict:
    """The paired change of one probe (or the task: kind "mc") from two steps' per-item records:
    accuracy in points, with the gold answer's NLL per token and its margin beside it; or NLL in %.
    Without records on both sides: {} (the caller says so)."""
    if not before or not after:
        return {}
    if kind != "mc":
        return nll_change(before["nll"], after["nll"])
    gold_nll = [[-lp / max(t, 1) for lp, t in zip(r["gold_logprob"], r["gold_tokens"])] for r in (before, after)]
    return {
        **accuracy_change(before["correct"], after["correct"]),
        "signal": {"name": "gold answer NLL per token", **nll_change(*gold_nll)},
        "margin": {"name": "gold minus best wrong, log-prob", **mean_change(before["margin"], after["margin"])},
    }


def record_changes(first: dict, now: dict) -> dict[str, dict]:
    """Each probe's paired change between two steps' records (RUN/records/), from the items alone:
    {name: {"unit", "change", "ci95", "p", "verdict", …}}."""
    out = {}
    for name, items in (now.get("probes") or {}).items():
        before = (first.get("probes") or {}).get(name)
        if before:
            out[name] = paired("mc" if "correct" in items else "text", before, items)
    return out


def _row(b: dict, a: dict, change: dict) -> dict:
    if b["kind"] == "mc":
        row = {
            "metric": "acc",
            "unit": "points",
            "before": b["acc"],
            "after": a["acc"],
            "change": 100.0 * (a["acc"] - b["acc"]),
            "retention": a["acc"] / b["acc"] if b["acc"] else None,
        }
    else:
        row = {
            "metric": "nll_per_token",
            "unit": "%",
            "before": b["nll_per_token"],
            "after": a["nll_per_token"],
            "change": 100.0 * (a["nll_per_token"] / b["nll_per_token"] - 1),
            "bits_per_byte_before": b.get("bits_per_byte"),
            "bits_per_byte_after": a.get("bits_per_byte"),
        }
    row["n"] = b.get("n")
    if change:
        row.update({k: v for k, v in change.items() if k not in ("unit", "before", "after", "n")})
    else:
        row.update(ci95=None, p=None, verdict=UNPAIRED)
    return row


UNPAIRED = "not paired: no per-item records on both sides"


def forgetting_report(before: dict, after: dict, items: tuple[dict, dict] = ({}, {}), task: dict | None = None) -> dict:
    """Per probe: before, after, the paired change (points or % NLL) with its 95 % interval, p and
    verdict (evals/paired.py); retention or bits per byte. `items`: the two steps' per-item records
    by probe name; `task`: {"before", "after"} summaries of the task accuracy with their `items`."""
    rows = {}
    for name, b in before.items():
        if name.startswith("_") or name not in after:
            continue
        rows[name] = _row(b, after[name], paired(b["kind"], items[0].get(name), items[1].get(name)))
    report = {"probes": rows}
    if task:
        change = paired("mc", task["before"].get("items"), task["after"].get("items"))
        report["task"] = {
            "before": task["before"]["accuracy"],
            "after": task["after"]["accuracy"],
            "n": task["after"]["n"],
            **_task_change(change, task),
        }
    return report


def _task_change(change: dict, task: dict) -> dict:
    if not change:
        return {
            "unit": "points",
            "change": 100.0 * (task["after"]["accuracy"] - task["before"]["accuracy"]),
            "ci95": None,
            "p": None,
            "verdict": UNPAIRED,
        }
    return {k: v for k, v in change.items() if k not in ("before", "after", "n")}


def describe_change(r: dict) -> str:
    """ "−7.0 points [−12.5, −1.5], p=0.02, lost" (or the unpaired note)."""
    unit = r.get("unit", "points")
    if not r.get("ci95"):
        return f"{r['change']:+.1f} {unit} ({r.get('verdict') or UNPAIRED})"
    lo, hi = r["ci95"]
    return f"{r['change']:+.1f} {unit} [{lo:+.1f}, {hi:+.1f}], p={_p(r['p'])}, {r['verdict']}"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def render_report(report: dict) -> str:
    lines = ["[forgetting] general skills, θ0 → fine-tuned (paired on the same items; 95 % intervals):"]
    if not report["probes"]:
        lines = ["[eval] θ0 → fine-tuned (paired on the same records; 95 % interval):"]
    for name, r in report["probes"].items():
        if r["metric"] == "acc":
            lines.append(
                f"  {name:<12} acc {100 * r['before']:5.1f}% → {100 * r['after']:5.1f}%  {describe_change(r)}"
                f" (n={r['n']})"
            )
            if r.get("signal"):
                lines.append(f"  {'':<12} gold answer NLL/token {describe_change(r['signal'])}")
        else:
            lines.append(
                f"  {name:<12} NLL/token {r['before']:.3f} → {r['after']:.3f}  {describe_change(r)}"
                f" (bits/byte {r['bits_per_byte_before']:.3f} → {r['bits_per_byte_after']:.3f}, n={r['n']})"
            )
    if "task" in report:
        t = report["task"]
        lines.append(
            f"  {'task':<12} acc {100 * t['before']:5.1f}% → {100 * t['after']:5.1f}%  {describe_change(t)}"
            f" (n={t['n']}): what was learned"
        )
    return "\n".join(lines)
