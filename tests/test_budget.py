"""eval.forgetting_budget: each probed step is checked against the budget with its task accuracy;
the best inside it is exported to RUN/best-in-budget/ (the model of that step), θ* is checked
too, and results.json names what was kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.atomic import verify_dir
from fulltune.cli import main
from fulltune.commands.interpolate import changes
from fulltune.evals.budget import judge, losses, within
from fulltune.evals.forgetting import describe_change

MC = [
    {"context": "the movie was", "choices": [" great fun", " dull"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good"], "gold": 1},
    {"context": "what is the capital of france", "choices": [" paris", " the film"], "gold": 0},
]
TEXT = [{"text": "the movie was great fun and the plot was good"}, {"text": "what is the capital of france paris"}]


def _run(tiny_dir, tmp_path, name, limits):
    data = write_jsonl(tmp_path / "chat.jsonl", sentiment_records(24))
    out = tmp_path / name
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *tiny_overrides(
                    tiny_dir,
                    data,
                    out,
                    **{
                        "train.max_steps": 6,
                        "optim.lr": 3e-3,
                        "train.save_interval": 2,
                        "train.keep_checkpoints": 5,
                        "eval.task_file": write_jsonl(tmp_path / "task.jsonl", sentiment_records(8, seed=3)),
                        "eval.labels": "[positive, negative]",
                        "eval.probe_interval": 2,
                        "data.val_fraction": 0,
                        "eval.probes": (
                            f"[mc:{write_jsonl(tmp_path / 'mc.jsonl', MC)}, "
                            f"text:{write_jsonl(tmp_path / 'gen.jsonl', TEXT)}]"
                        ),
                        "eval.forgetting_budget": limits,
                    },
                ),
            ]
        )
        == 0
    )
    return out, json.loads((out / "results.json").read_text())["budget"]


@pytest.mark.parametrize("limits", ["{mc: 100, gen: 1000}", "{gen: 0}"])
def test_the_best_step_inside_the_budget_is_kept(tiny_dir, tmp_path, limits):
    out, budget = _run(tiny_dir, tmp_path, "run", limits)
    checked = budget["checked"]
    assert [c["step"] for c in checked] == [2, 4, 6]  # the probed steps, then θ*
    assert budget["rule"] == "significant"
    for c in checked:  # each loss carries its paired interval, and the rule judges the interval
        assert all(loss["ci95"][0] <= loss["loss"] <= loss["ci95"][1] for loss in c["losses"].values())
        each = {k: c["losses"][k]["ci95"][0] <= v for k, v in budget["limits"].items()}
        assert c["within"] == each and c["in_budget"] == all(each.values())
    inside = [c for c in checked if c["in_budget"]]
    if not inside:
        assert budget["best"] is None and not (out / "best-in-budget").exists()
        return
    best = budget["best"]  # the highest task score; on a tie, the least lost on the worst probe (first such)
    top = max(inside, key=lambda c: (c["task_accuracy"], -max(v["loss"] for v in c["losses"].values())))
    assert best["step"] == top["step"] and best["in_budget"]
    if best["step"] == 6:
        assert best["path"] == str(out / "final")
    else:  # the exported model is that step's model, bit for bit
        card = (out / "best-in-budget" / "README.md").read_text()  # its model card, in its manifest
        assert f"This is the run's step {best['step']}, the best task score inside its forgetting budget." in card
        assert verify_dir(out / "best-in-budget") is None
        kept = load_file(str(out / "best-in-budget" / "model.safetensors"))
        ckpt = load_file(str(out / "checkpoints" / f"step-{best['step']:07d}" / "model.safetensors"))
        common = kept.keys() & ckpt.keys()  # the tied embedding is saved under one name or the other
        assert len(common) == len(kept) - 1 and all(torch.equal(kept[k], ckpt[k]) for k in common)
        assert torch.equal(kept["model.embed_tokens.weight"], ckpt["lm_head.weight"])


def test_losses_are_points_and_percent():
    rows = {  # forgetting-report rows: an accuracy probe that lost 3 points, a code probe whose NLL rose 5 %
        "arc": {"metric": "acc", "unit": "points", "change": -3.0, "ci95": [-5.0, -1.0]},
        "code": {"metric": "nll_per_token", "unit": "%", "change": 5.0, "ci95": [4.0, 6.0]},
        "old": {"metric": "acc", "before": 0.5, "after": 0.47, "change": -0.03},  # before per-item records
    }
    lost = losses(rows)
    assert lost["arc"] == {"loss": 3.0, "ci95": [1.0, 5.0]} and lost["code"] == {"loss": 5.0, "ci95": [4.0, 6.0]}
    assert lost["old"]["loss"] == pytest.approx(3.0) and lost["old"]["ci95"] is None


@pytest.mark.parametrize(
    ("rule", "limit", "inside"),
    [
        ("point", 3.0, True),  # the point estimate is at the limit
        ("point", 2.9, False),
        ("significant", 2.0, True),  # beyond, but the interval reaches back inside: not significantly beyond
        ("significant", 0.9, False),  # the whole interval [1, 5] is beyond 0.9
        ("strict", 5.0, True),  # the whole interval is inside
        ("strict", 4.9, False),
    ],
)
def test_each_budget_rule_reads_the_interval(rule, limit, inside):
    loss = {"loss": 3.0, "ci95": [1.0, 5.0]}
    assert within(limit, loss, rule) is inside
    assert within(limit, {"loss": 3.0, "ci95": None}, rule) is (limit >= 3.0)  # unpaired: the point estimate
    assert judge({"arc": limit}, {"arc": loss}, rule) == (inside, {"arc": inside})
    assert judge({"missing": 100}, {"arc": loss}, rule) == (False, {"missing": False})  # not scored: outside


def test_when_nothing_stays_inside_only_theta0_does(monkeypatch, capsys, tiny_dir, tmp_path):
    from fulltune.evals import budget

    every = {"loss": 50.0, "ci95": [45.0, 55.0]}  # every probe lost 50 points, significantly
    monkeypatch.setattr(budget, "losses", lambda rows: {name: every for name in rows})
    out, kept = _run(tiny_dir, tmp_path, "run", "{mc: 10}")
    assert kept["best"] is None and [c["in_budget"] for c in kept["checked"]] == [False] * 3
    assert not (out / "best-in-budget").exists()
    printed = capsys.readouterr().out
    assert "[budget] step 2 is outside the budget (task " in printed
    assert "[budget] no checked step stays inside the budget (rule significant; θ*: task " in printed
    assert "mc +50.0 [+45.0, +55.0] (limit 10, over)" in printed
    assert "\n  forgetting budget     no checked step stays inside (mc 10, rule significant); only θ0 does\n" in printed


def test_interpolate_finds_the_largest_alpha_inside_the_budget():
    """A code probe whose NLL grows 10 % per unit of α: a budget of 6.5 % puts the edge at α 0.65; the
    grid 0, 0.5, 1 and three bisections (0.75 out, 0.625 in, 0.6875 out) end at 0.625."""
    from fulltune.commands.interpolate import budget_search

    scored = []

    def score(alpha):
        scored.append(alpha)
        return {
            "alpha": alpha,
            "task": {"accuracy": 0.5 + 0.3 * alpha},
            "probes": {"code": {"kind": "text", "nll_per_token": 2.0 * (1 + 0.1 * alpha)}},
        }

    rows = [score(a) for a in (0.0, 0.5, 1.0)]
    found = budget_search(score, rows, {"code": 6.5}, 3)
    assert scored == [0.0, 0.5, 1.0, 0.75, 0.625, 0.6875]
    assert found["alpha"] == 0.625 and found["losses"]["code"]["loss"] == pytest.approx(6.25)
    assert found["losses"]["code"]["ci95"] is None  # rows without per-item records: the point estimate decides
    assert found["task_accuracy"] == pytest.approx(0.5 + 0.3 * 0.625) and len(rows) == 6


def test_interpolate_reads_the_runs_budget_and_refuses_a_bad_one(capsys, tiny_dir, tmp_path):
    out, _ = _run(tiny_dir, tmp_path, "run", "{mc: 100, gen: 1000}")
    wise = tmp_path / "wise"
    assert (
        main(
            [
                "interpolate",
                str(tiny_dir),
                str(out / "final"),
                "--alphas",
                "0.5,1",
                "--out",
                str(wise),
                "--precision",
                "fp32",
                "--save-models",
            ]
        )
        == 0
    )  # the budget from the run's config.yaml; α 0 added as θ0
    result = json.loads((wise / "interpolate.json").read_text())
    assert [r["alpha"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert result["budget"]["limits"] == {"mc": 100, "gen": 1000} and result["budget"]["alpha"] == 1.0  # all inside
    assert result["budget"]["rule"] == "significant" and len(result["rows"][2]["items"]["probes"]["mc"]["correct"]) == 3
    mc = result["budget"]["losses"]["mc"]  # paired with the α = 0 row's per-item records
    assert mc["ci95"][0] <= mc["loss"] <= mc["ci95"][1]
    assert json.loads((out / "results.json").read_text())["wise_budget"] == result["budget"]  # the run keeps it
    card = (wise / "alpha-0.50" / "README.md").read_text()  # each saved blend's card: α, its scores, from θ0
    assert "# WiSE-FT blend at α = 0.50 of" in card and verify_dir(wise / "alpha-0.50") is None
    mc_change = changes(result["rows"], result["rows"][1])["mc"]
    assert f"- mc: {describe_change(mc_change)} (against θ0, paired)" in card
    assert main(["report", str(out)]) == 0
    assert "WiSE-FT inside the budget</th><td>largest α 1.000, task " in (out / "report.html").read_text()
    assert main(["interpolate", str(tiny_dir), str(out / "final"), "--budget", "{arc_easy: 2}"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "fulltune: error: --budget: arc_easy not among the probes scored "
            f"(mc:{tmp_path / 'mc.jsonl'}, text:{tmp_path / 'gen.jsonl'})"
        )
    )
