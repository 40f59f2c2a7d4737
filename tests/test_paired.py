"""Paired changes θ0 → θ (evals/paired.py): McNemar's exact p, the interval's coverage, the bootstrap
of NLL-like signals, the verdict's two conditions, a planted change detected, and what a size can
detect."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fulltune.evals import paired
from fulltune.evals.forgetting import forgetting_report
from fulltune.evals.forgetting import paired as paired_probe


@pytest.mark.parametrize(
    ("lost", "gained", "p"),
    [(0, 0, 1.0), (0, 6, 2 / 64), (2, 8, 2 * (1 + 10 + 45) / 1024), (5, 5, 1.0), (30, 10, None)],
)
def test_mcnemar_exact_p(lost, gained, p):
    n = lost + gained
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n) if n else 1.0
    assert paired.mcnemar_p(lost, gained) == pytest.approx(by_hand if p is None else p)
    assert paired.mcnemar_p(lost, gained) == paired.mcnemar_p(gained, lost)  # two-sided


def test_accuracy_change_counts_the_flipped_items():
    before = [1] * 40 + [0] * 60
    after = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 58  # 10 lost, 2 gained
    c = paired.accuracy_change(before, after)
    assert (c["lost_items"], c["gained_items"], c["n"]) == (10, 2, 100)
    assert c["change"] == pytest.approx(-8.0) and c["before"] == 40.0 and c["after"] == 32.0
    lo, hi = c["ci95"]
    assert lo < -8.0 < hi < 0  # the loss is significant
    assert c["p"] == pytest.approx(paired.mcnemar_p(10, 2)) and c["verdict"] == paired.LOST
    # the unpaired standard error of the difference would be 6.8 points: the paired one is 3.4
    assert (hi - lo) / (2 * 1.96) < 0.55 * 100 * math.sqrt(0.4 * 0.6 / 100 + 0.32 * 0.68 / 100)


def test_identical_records_are_no_change():
    items = [1, 0, 1, 1, 0] * 10
    c = paired.accuracy_change(items, items)
    assert c["change"] == 0 and c["p"] == 1.0 and c["ci95"][0] < 0 < c["ci95"][1] and c["verdict"] == paired.NONE
    nll = list(np.random.default_rng(0).gamma(2.0, 1.0, 50))
    n = paired.nll_change(nll, nll)
    assert n["change"] == 0 and n["ci95"] == [0.0, 0.0] and n["verdict"] == paired.NONE and n["p"] == 1.0


def test_the_accuracy_interval_covers_a_zero_change_95_percent_of_the_time():
    """5,000 simulated probes of 50 items where 20 % of the answers flip at random, half each way:
    the true change is 0, and the 95 % interval must cover it at (close to) the nominal rate."""
    rng = np.random.default_rng(1)
    covered = 0
    trials = 5000
    for _ in range(trials):
        before = rng.random(50) < 0.5
        flip = rng.random(50) < 0.2
        after = np.where(flip, ~before, before)
        lo, hi = paired.accuracy_change(before, after)["ci95"]
        covered += lo <= 0 <= hi
    assert covered / trials >= 0.94


def test_a_planted_shift_of_the_gold_logprob_is_detected():
    """Gold answers' log-probabilities all lowered by 0.3 nats plus noise: the NLL-like signal's
    change is found with an interval around the planted one, and called lost."""
    rng = np.random.default_rng(2)
    before = rng.gamma(2.0, 0.8, 200)  # per-item NLL of the gold answer
    after = before + 0.3 + rng.normal(0, 0.2, 200)
    c = paired.nll_change(before, after)
    planted = 100 * (after.sum() / before.sum() - 1)
    assert c["change"] == pytest.approx(planted) and c["ci95"][0] < planted < c["ci95"][1]
    assert c["ci95"][0] > 0 and c["p"] < 0.01 and c["verdict"] == paired.LOST
    assert paired.nll_change(before, after) == c  # a fixed seed: the same records, the same interval
    m = paired.mean_change(-before, -after)
    assert m["change"] == pytest.approx(-(after - before).mean()) and m["ci95"][1] < 0


def test_a_negligible_but_consistent_shift_is_not_forgetting():
    before = np.linspace(1.0, 3.0, 400)
    after = before * 1.002  # +0.2 %, on every item: significant, and below the 0.5 % worth reporting
    c = paired.nll_change(before, after)
    assert c["ci95"][0] > 0 and c["p"] < 0.01 and c["verdict"] == paired.NONE
    assert paired.verdict(0.6, [0.1, 1.1], 0.5, higher_is_better=False) == paired.LOST
    assert paired.verdict(0.6, [-0.1, 1.3], 0.5, higher_is_better=False) == paired.NONE  # interval holds 0
    assert paired.verdict(0.6, [0.1, 1.1], 0.5, higher_is_better=True) == paired.GAINED


def test_detectable_change_and_needed_items_are_inverse():
    for f in (0.05, 0.2, 0.5):
        n = paired.items_for_points(2.0, f)
        assert paired.detectable_points(n, f) <= 2.0 < paired.detectable_points(n - 1, f)
    # 200 items, 16 % flipping (the ARC-Easy run): ~7.9 points detectable
    assert paired.detectable_points(200, 0.16) == pytest.approx(100 * (1.96 + 0.8416) * math.sqrt(0.16 / 200), 1e-3)
    n = paired.items_for_percent(2.0, 0.05)
    assert paired.detectable_percent(n, 0.05) <= 2.0 < paired.detectable_percent(n - 1, 0.05)


def test_the_forgetting_report_pairs_probe_and_task_records():
    rng = np.random.default_rng(3)
    correct0 = (rng.random(80) < 0.6).astype(int).tolist()
    correct1 = [c if i % 5 else 0 for i, c in enumerate(correct0)]  # every fifth item now wrong
    lp0 = (-rng.gamma(2.0, 1.0, 80)).tolist()
    mc = [
        {"correct": c, "gold_logprob": lp, "gold_tokens": [2] * 80, "margin": [x + 1 for x in lp]}
        for c, lp in ((correct0, lp0), (correct1, [x - 0.5 for x in lp0]))
    ]
    text = [{"nll": [10.0, 20.0, 30.0], "tokens": [5, 5, 5]}, {"nll": [11.0, 22.0, 33.0], "tokens": [5, 5, 5]}]
    before = {"arc": {"kind": "mc", "acc": np.mean(correct0), "n": 80}, "code": {"kind": "text", "nll_per_token": 4.0}}
    after = {"arc": {"kind": "mc", "acc": np.mean(correct1), "n": 80}, "code": {"kind": "text", "nll_per_token": 4.4}}
    before["code"].update(n=3, bits_per_byte=1.0)
    after["code"].update(n=3, bits_per_byte=1.1)
    task = {"before": {"accuracy": np.mean(correct0), "n": 80, "items": mc[0]},
            "after": {"accuracy": np.mean(correct1), "n": 80, "items": mc[1]}}  # fmt: skip
    report = forgetting_report(before, after, ({"arc": mc[0], "code": text[0]}, {"arc": mc[1], "code": text[1]}), task)
    arc, code = report["probes"]["arc"], report["probes"]["code"]
    lost = sum(1 for i, c in enumerate(correct0) if c and i % 5 == 0)
    assert arc["lost_items"] == lost and arc["gained_items"] == 0 and arc["change"] == pytest.approx(-100 * lost / 80)
    assert arc["signal"]["change"] > 0 and arc["signal"]["verdict"] == paired.LOST  # the gold answer got less likely
    assert arc["margin"]["change"] == pytest.approx(-0.5)
    assert code["change"] == pytest.approx(10.0) and code["verdict"] in (paired.LOST, paired.NONE)
    assert report["task"]["lost_items"] == lost and report["task"]["ci95"] == arc["ci95"]
    assert paired_probe("mc", None, mc[1]) == {}  # no θ0 records: not paired


def test_seeds_change_pools_runs_and_reduces_to_one_run():
    rng = np.random.default_rng(5)
    before = (rng.random(300) < 0.6).astype(float)
    afters = [np.where(rng.random(300) < 0.1, 1 - before, before) for _ in range(3)]  # 10 % of answers flip
    pooled = paired.seeds_change("points", before, afters)
    per_seed = [100 * (a.mean() - before.mean()) for a in afters]
    assert pooled["per_seed"] == pytest.approx(per_seed) and pooled["change"] == pytest.approx(np.mean(per_seed))
    assert pooled["ci95"][0] < pooled["change"] < pooled["ci95"][1] and pooled["seeds"] == 3
    one = paired.seeds_change("points", before, afters[:1])  # one run: the items' bootstrap alone
    single = paired.accuracy_change(before.astype(bool), afters[0].astype(bool))
    assert one["change"] == pytest.approx(single["change"])
    assert abs(one["ci95"][0] - single["ci95"][0]) < 2.0 and abs(one["ci95"][1] - single["ci95"][1]) < 2.0
    nll0 = rng.gamma(2.0, 10.0, 120)
    rises = [nll0 * (1 + s) + rng.normal(0, 1, 120) for s in (0.04, 0.05, 0.06)]
    c = paired.seeds_change("%", nll0, rises)
    assert c["change"] == pytest.approx(np.mean([100 * (r.sum() / nll0.sum() - 1) for r in rises]))
    assert 0 < c["ci95"][0] < 5 < c["ci95"][1] and c["verdict"] == paired.LOST
    # the seeds' spread widens the interval: three runs that disagree against three that agree
    spread = [nll0 * (1 + s) for s in (-0.05, 0.05, 0.15)]
    agree = [nll0 * 1.05] * 3
    width = [np.diff(paired.seeds_change("%", nll0, r)["ci95"])[0] for r in (spread, agree)]
    assert width[0] > 3 * width[1]


def test_spearman_and_its_interval():
    x = np.arange(12.0)
    assert paired.spearman(x, x**3)["rho"] == pytest.approx(1.0)
    assert paired.spearman(x, -x)["rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noise = paired.spearman(rng.normal(size=40), rng.normal(size=40))
    assert noise["ci95"][0] < 0 < noise["ci95"][1] and noise["n"] == 40
    strong = paired.spearman(x, x + rng.normal(0, 1.0, 12))
    assert strong["rho"] > 0.8 and strong["ci95"][0] > 0.3
