"""θ0's scores before the first step: from the cache of an earlier run on the same θ0 when there is
one (evals/records.py), and what the probes can detect at their sizes.

What a paired test can detect depends on how many answers flip between θ0 and θ, which is unknown
before training. Two figures are printed per multiple-choice probe:
- at a typical flip rate: the share of answers that flipped in this project's measured runs,
  relative to 2p(1−p), the rate at which answers would flip if θ's were independent of θ0's
  (`TYPICAL_FLIP_SHARE`; docs/forgetting.md, "What a run can detect");
- at that independent rate itself, a pessimistic bound.
For NLL probes: at the typical spread of the items' paired changes (`TYPICAL_NLL_SPREAD`, relative
to θ0's mean item). Each probe's measured cost per item is printed beside them.
"""

from __future__ import annotations

from collections.abc import Callable

from fulltune import distributed as D
from fulltune.evals import paired, records
from fulltune.model import resolve_model_path

# Measured on this project's runs (docs/forgetting.md, "What a run can detect"); see the docstring.
TYPICAL_FLIP_SHARE = 0.25
TYPICAL_NLL_SPREAD = 0.05


def cached(run, part: str, what: object, score: Callable[[], dict]) -> tuple[dict, bool]:
    """θ0's `part` ("task" or "probes") result, per-item records included: `score()`, or the result of
    an earlier run with the same key (the model's content, `what` was scored, precision, device,
    batch size, scorer version), and whether it came from the cache. Stored after scoring. Every rank
    takes the same branch."""
    if not run.cfg.eval.theta0_cache:
        return score(), False
    key = records.theta0_key(
        model_digest=records.model_digest(resolve_model_path(run.cfg.model.path)),
        what=[part, what],
        precision=run.precision,
        device=records.device_name(run.device),
        batch_size=run.cfg.eval.batch_size,
    )
    hit = records.cached_theta0(key)
    if D.any_rank(hit is None):
        result = score()
        records.store_theta0(key, result)
        return result, False
    print(f"[eval] θ0's {part} scores: from an earlier run on the same θ0 (cache {key[:12]}), not scored again")
    return hit, True


def detectable(probes: dict) -> dict:
    """Per probe, what a paired test at its n can detect (two-sided 95 %, 80 % power), the n that
    would detect 2 points (or 2 % NLL), and the measured cost per item."""
    out = {}
    for name, s in probes.items():
        if name.startswith("_"):
            continue
        n, per_item = s["n"], s.get("seconds", 0.0) / max(s["n"], 1)
        if s["kind"] == "mc":
            independent = max(2 * s["acc"] * (1 - s["acc"]), 1.0 / n)
            typical = TYPICAL_FLIP_SHARE * independent
            out[name] = {
                "unit": "points",
                "n": n,
                "detectable": paired.detectable_points(n, typical),
                "detectable_if_independent": paired.detectable_points(n, independent),
                "n_for_2": paired.items_for_points(2.0, typical),
                "seconds_per_item": per_item,
            }
        else:
            out[name] = {
                "unit": "%",
                "n": n,
                "detectable": paired.detectable_percent(n, TYPICAL_NLL_SPREAD),
                "n_for_2": paired.items_for_percent(2.0, TYPICAL_NLL_SPREAD),
                "seconds_per_item": per_item,
            }
    return out


def detectable_lines(table: dict) -> list[str]:
    lines = ["[detect] what these probes can detect (paired, two-sided 95 %, 80 % power):"]
    for name, d in table.items():
        unit = "points" if d["unit"] == "points" else "% NLL"
        worst = ""
        if "detectable_if_independent" in d:
            worst = f" (±{d['detectable_if_independent']:.1f} if answers flipped at random)"
        lines.append(
            f"  {name:<12} n={d['n']}: changes of ±{d['detectable']:.1f} {unit}{worst}; "
            f"±2 {unit} needs n ≈ {d['n_for_2']:,}; {d['seconds_per_item']:.2f} s per item"
        )
    return lines
