"""Paired changes θ0 → θ on the same items: the change, its 95% interval, a p-value and a verdict.

Every probe scores the same items before and after training, so a change's uncertainty comes
from the items that changed, not from each score's own standard error (which is usually far
larger, and is what fulltune printed until 2026-12).

- Accuracy (0/1 per item): the paired difference in points. Interval: Agresti & Min (2005), the
  Wald interval after adding ½ to each cell of the 2×2 table of (right, wrong) before × after,
  near-nominal coverage down to small n. p: McNemar's exact test (a binomial test on the items
  that flipped: lost against gained).
- NLL-like signals (an item's NLL, or the gold answer's NLL per token): the relative change of the
  items' total, 100·(Σ after / Σ before − 1) %. Such signals are skewed (a few items carry much of
  the sum), so the interval is a percentile bootstrap over items (2,000 resamples, a fixed seed:
  the same records give the same interval). p: a sign-flip permutation test of the items' paired
  differences.
- Other continuous signals (the margin of the gold answer over the best wrong one): the paired mean
  difference, with the same bootstrap and permutation test.

A verdict of "lost" or "gained" needs both an interval that excludes 0 and a change at least the
smallest worth reporting (0.5 points, 0.5 % NLL): a negligible but consistent shift of a
continuous signal is not forgetting. Otherwise the verdict is "no detectable change".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 %
Z80 = 0.8416212335729143  # 80 % power
SMALLEST = {"points": 0.5, "%": 0.5}  # the smallest change worth reporting, per unit
RESAMPLES = 2000
SEED = 20261207
LOST, GAINED, NONE = "lost", "gained", "no detectable change"


def mcnemar_p(lost: int, gained: int) -> float:
    """McNemar's exact two-sided p: under no change each flipped item is lost or gained with ½."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2**n)


def verdict(change: float, ci95: Sequence[float], smallest: float, higher_is_better: bool) -> str:
    """Lost, gained, or no detectable change (see the module's docstring)."""
    lo, hi = ci95
    if abs(change) < smallest or lo <= 0 <= hi:
        return NONE
    return GAINED if (change > 0) == higher_is_better else LOST


def accuracy_change(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """θ0 → θ accuracy on the same items, in points (higher is better)."""
    assert len(before) == len(after) and len(before) > 0, "paired records cover the same items"
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    n = len(b)
    lost, gained = int((b & ~a).sum()), int((~b & a).sum())
    lost_s, gained_s, n_s = lost + 0.5, gained + 0.5, n + 2.0  # Agresti–Min: ½ added to each of 4 cells
    centre = (gained_s - lost_s) / n_s
    half = Z95 * math.sqrt(max((lost_s + gained_s) - (gained_s - lost_s) ** 2 / n_s, 0.0)) / n_s
    change = 100.0 * (gained - lost) / n
    ci = [100.0 * max(centre - half, -1.0), 100.0 * min(centre + half, 1.0)]
    return {
        "unit": "points",
        "before": 100.0 * b.mean(),
        "after": 100.0 * a.mean(),
        "change": change,
        "ci95": ci,
        "p": mcnemar_p(lost, gained),
        "verdict": verdict(change, ci, SMALLEST["points"], higher_is_better=True),
        "lost_items": lost,
        "gained_items": gained,
        "n": n,
    }


def _resample_index(n: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))


def _sign_flip_p(diff: np.ndarray) -> float:
    """Two-sided p of Σ diff under a random sign per item (the pair's order exchangeable)."""
    signs = np.random.default_rng(SEED + 1).choice(np.array([-1.0, 1.0]), size=(RESAMPLES, len(diff)))
    null = np.abs(signs @ diff)
    return float((1 + (null >= abs(diff.sum()) - 1e-12).sum()) / (RESAMPLES + 1))


def nll_change(before: Sequence[float], after: Sequence[float]) -> dict:
    """θ0 → θ relative change of a summed NLL-like signal over the same items, in % (lower is better)."""
    assert len(before) == len(after) and len(before) > 0, "paired records cover the same items"
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    assert b.sum() > 0, "an NLL total is positive"
    idx = _resample_index(len(b))
    ratios = a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1e-300)
    change = 100.0 * (a.sum() / b.sum() - 1.0)
    ci = [float(x) for x in 100.0 * (np.percentile(ratios, [2.5, 97.5]) - 1.0)]
    return {
        "unit": "%",
        "before": float(b.mean()),
        "after": float(a.mean()),
        "change": float(change),
        "ci95": ci,
        "p": _sign_flip_p(a - b),
        "verdict": verdict(change, ci, SMALLEST["%"], higher_is_better=False),
        "n": len(b),
    }


def mean_change(before: Sequence[float], after: Sequence[float]) -> dict:
    """θ0 → θ paired mean difference of a continuous signal, in its own units (no verdict)."""
    assert len(before) == len(after) and len(before) > 0, "paired records cover the same items"
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    means = diff[_resample_index(len(diff))].mean(axis=1)
    return {
        "before": float(np.mean(before)),
        "after": float(np.mean(after)),
        "change": float(diff.mean()),
        "ci95": [float(x) for x in np.percentile(means, [2.5, 97.5])],
        "p": _sign_flip_p(diff),
        "n": len(diff),
    }


def detectable_points(n: int, flip_rate: float) -> float:
    """The smallest accuracy change (points) a paired test at n items detects (two-sided 95 %, 80 %
    power) when a share `flip_rate` of the answers flips: (z.975 + z.8)·√(f / n)."""
    return 100.0 * (Z95 + Z80) * math.sqrt(flip_rate / n)


def items_for_points(points: float, flip_rate: float) -> int:
    """The items a paired test needs to detect `points` at `flip_rate` (the inverse of the above)."""
    return math.ceil(flip_rate * ((Z95 + Z80) * 100.0 / points) ** 2)


def detectable_percent(n: int, spread: float) -> float:
    """The smallest relative NLL change (%) detectable at n items when the items' paired changes,
    relative to θ0's mean item, spread with standard deviation `spread`."""
    return 100.0 * (Z95 + Z80) * spread / math.sqrt(n)


def items_for_percent(percent: float, spread: float) -> int:
    return math.ceil(((Z95 + Z80) * 100.0 * spread / percent) ** 2)


def _two_stage_index(seeds: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Resamples of runs (seeds) and of items, drawn together (RESAMPLES of each, a fixed seed)."""
    rng = np.random.default_rng(SEED + 2)
    return rng.integers(0, seeds, size=(RESAMPLES, seeds)), rng.integers(0, n, size=(RESAMPLES, n))


def seeds_change(kind: str, before: Sequence[float], afters: Sequence[Sequence[float]]) -> dict:
    """θ0 → θ over several training runs (seeds) scored on the same items as θ0, pooled.

    kind "points": 0/1 records, the mean accuracy change in points; kind "%": an NLL-like signal,
    100·(mean over runs of Σ after / Σ before − 1). The 95 % interval is a two-stage percentile
    bootstrap: runs with replacement, then items with replacement (paired: the same items on both
    sides), so it carries both the items' and the seeds' variation (with 3 runs the seeds' part is
    underestimated; `per_seed` shows each run's own change). One run: the items' bootstrap alone."""
    assert kind in ("points", "%"), kind
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(afters, dtype=np.float64)
    assert a.ndim == 2 and a.shape[1] == len(b) > 0, "every run is scored on θ0's items"
    runs, items = _two_stage_index(len(a), len(b))
    boot = a[runs[:, :, None], items[:, None, :]]  # [resample, run, item]
    if kind == "points":
        per_seed = 100.0 * (a.mean(axis=1) - b.mean())
        dist = 100.0 * (boot.mean(axis=(1, 2)) - b[items].mean(axis=1))
    else:
        per_seed = 100.0 * (a.sum(axis=1) / b.sum() - 1.0)
        dist = 100.0 * (boot.sum(axis=2).mean(axis=1) / np.maximum(b[items].sum(axis=1), 1e-300) - 1.0)
    change = float(per_seed.mean())
    ci = [float(x) for x in np.percentile(dist, [2.5, 97.5])]
    return {
        "unit": kind,
        "change": change,
        "ci95": ci,
        "per_seed": [float(x) for x in per_seed],
        "verdict": verdict(change, ci, SMALLEST[kind], higher_is_better=kind == "points"),
        "n": len(b),
        "seeds": len(a),
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rank correlation of paired observations, with a percentile bootstrap 95 % interval
    over the pairs (resamples with a constant side are dropped). Ties are broken by order: meant for
    continuous measurements such as a KL and a probe's change."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    assert xs.shape == ys.shape and len(xs) >= 3, "at least three pairs"

    def rho(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        ru = np.argsort(np.argsort(u, axis=-1), axis=-1).astype(np.float64)
        rv = np.argsort(np.argsort(v, axis=-1), axis=-1).astype(np.float64)
        ru -= ru.mean(axis=-1, keepdims=True)
        rv -= rv.mean(axis=-1, keepdims=True)
        den = np.sqrt((ru**2).sum(axis=-1) * (rv**2).sum(axis=-1))
        return np.where(den > 0, (ru * rv).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)

    idx = np.random.default_rng(SEED + 3).integers(0, len(xs), size=(RESAMPLES, len(xs)))
    boot = rho(xs[idx], ys[idx])
    boot = boot[~np.isnan(boot)]
    return {
        "rho": float(rho(xs, ys)),
        "ci95": [float(v) for v in np.percentile(boot, [2.5, 97.5])],
        "n": len(xs),
    }
