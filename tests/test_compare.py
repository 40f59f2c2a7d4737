"""`fulltune compare`: finished runs side by side (markdown table + an offline HTML page with the
task-gain vs forgetting Pareto plot), each number taken from the runs' own files."""

from __future__ import annotations

import json
import math

import pytest
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.cli import main
from fulltune.commands.compare import _row, markdown, pareto, rows_of, run_row

MC = [
    {"context": "the movie was", "choices": [" great fun", " dull"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good"], "gold": 1},
    {"context": "what is the capital of france", "choices": [" paris", " the film"], "gold": 0},
]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = write_jsonl(tmp / "chat.jsonl", sentiment_records(24))
    settings = {
        "eval.task_file": write_jsonl(tmp / "task.jsonl", sentiment_records(6, seed=3)),
        "eval.labels": "[positive, negative]",
        "eval.probes": f"[mc:{write_jsonl(tmp / 'mc.jsonl', MC)}]",
        "data.val_fraction": 0.2,
    }
    out = {}
    for name, lr in (("slow", 1e-4), ("fast", 3e-3)):
        out[name] = tmp / name
        assert (
            main(
                [
                    "train",
                    QUICKSTART,
                    *tiny_overrides(tiny_dir, data, out[name], **settings, **{"train.max_steps": 4, "optim.lr": lr}),
                ]
            )
            == 0
        )
    return out


def test_each_row_is_the_runs_own_numbers(runs, tiny_dir):
    row = run_row(runs["fast"])
    results = json.loads((runs["fast"] / "results.json").read_text())
    assert row["task"] == pytest.approx(100 * results["task_accuracy_final"]["accuracy"])
    assert row["val_loss"] == results["final_val_loss"] and row["time_s"] == results["train_time_s"]
    assert row["probes"]["mc"] == pytest.approx(100 * results["forgetting"]["probes"]["mc"]["change"])
    final, theta0 = (
        load_file(str(runs["fast"] / "final" / "model.safetensors")),
        load_file(str(tiny_dir / "model.safetensors")),
    )
    expected = math.sqrt(
        sum(float((final[k].double() - theta0[k].double()).pow(2).sum()) for k in final if k in theta0)
    )
    assert row["distance"] == pytest.approx(expected) and row["distance"] > 0
    assert run_row(runs["slow"])["distance"] < row["distance"]  # a 30× smaller lr moves less


def test_the_table_the_page_and_the_front(capsys, runs, tmp_path):
    out = tmp_path / "c.html"
    assert main(["compare", str(runs["slow"]), str(runs["fast"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        "| run | task acc % | task gain [95 % CI] | val loss | Δ mc (points) [95 % CI] | ‖θ−θ0‖ | peak GB | time s |"
    )
    assert printed[2].startswith(f"| {runs['slow']} | ") and printed[3].startswith(f"| {runs['fast']} | ")
    rows = [run_row(runs["slow"]), run_row(runs["fast"])]
    lo, hi = rows[1]["intervals"]["mc"]  # the paired interval from the run's per-item records, in the cell
    assert (
        lo <= rows[1]["probes"]["mc"] <= hi and f"{rows[1]['probes']['mc']:+.1f} [{lo:+.1f}, {hi:+.1f}]" in printed[3]
    )
    front = pareto(rows)
    assert printed[-1].startswith(f"[compare] Pareto front (task gain vs forgetting): {', '.join(front)}")
    page = out.read_text()
    assert page.count("plotly.js v") == 1 and 'id="pareto"' in page and str(runs["fast"]) in page


def test_pareto_keeps_exactly_the_runs_nothing_beats():
    rows = [
        {"run": "a", "task_gain": 10, "forgetting": 5},
        {"run": "b", "task_gain": 12, "forgetting": 6},
        {"run": "c", "task_gain": 9, "forgetting": 7},
        {"run": "d", "task_gain": 10, "forgetting": 5},
    ]
    assert pareto(rows) == ["a", "b", "d"]  # c is beaten by a; a and d tie


def test_an_unfinished_run_is_one_line(capsys, runs, tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    assert main(["compare", str(runs["slow"]), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fulltune: error: {tmp_path}: not finished (no results.json); compare takes finished runs"
    )


def test_an_interpolation_directory_adds_a_row_per_alpha(capsys, runs, tiny_dir, tmp_path):
    """Without an α = 0 row the changes are measured from the run's own θ0 scores: α = 1 (θ* exactly)
    then reads as the run's own row; with one, α = 0 changes nothing. ‖θ(α) − θ0‖ = α‖θ* − θ0‖."""
    wise = tmp_path / "wise"
    assert (
        main(
            [
                "interpolate",
                str(tiny_dir),
                str(runs["fast"] / "final"),
                "--alphas",
                "0.5,1",
                "--precision",
                "fp32",
                "--out",
                str(wise),
            ]
        )
        == 0
    )
    own = run_row(runs["fast"])
    half, one = rows_of(wise)
    assert (half["run"], one["run"]) == (f"{wise} α=0.5", f"{wise} α=1")
    assert one["task_gain"] == pytest.approx(own["task_gain"]) and one["probes"]["mc"] == pytest.approx(
        own["probes"]["mc"], abs=1e-6
    )
    assert half["distance"] == pytest.approx(own["distance"] / 2) and one["distance"] == pytest.approx(own["distance"])
    assert all(r["time_s"] is None and r["peak_gb"] is None for r in (half, one))  # blends are not trained
    zero_dir = tmp_path / "wise0"
    assert (
        main(
            [
                "interpolate",
                str(tiny_dir),
                str(runs["fast"] / "final"),
                "--alphas",
                "0,1",
                "--precision",
                "fp32",
                "--out",
                str(zero_dir),
            ]
        )
        == 0
    )
    zero, _ = rows_of(zero_dir)
    assert zero["task_gain"] == 0 and zero["probes"] == {"mc": 0.0} and zero["distance"] == 0
    capsys.readouterr()
    assert main(["compare", str(runs["slow"]), str(wise), "--out", str(tmp_path / "c.html")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:5]] == [f"| {runs['slow']}", f"| {wise} α=0.5", f"| {wise} α=1"]


def test_an_interpolation_without_theta0s_scores_is_one_line(capsys, tmp_path):
    (tmp_path / "interpolate.json").write_text(
        json.dumps(
            {
                "theta0": "default",
                "finetuned": str(tmp_path / "model"),
                "rows": [{"alpha": 0.5, "task": {"accuracy": 0.5}}],
            }
        )
    )
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fulltune: error: {tmp_path / 'interpolate.json'}: no α = 0 row, and {tmp_path / 'model'} is not a run's "
        "final/ with θ0's scores; rerun interpolate with 0 among --alphas"
    )
    (tmp_path / "interpolate.json").write_text('{"rows": [')
    assert main(["compare", str(tmp_path)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(
            f"fulltune: error: {tmp_path / 'interpolate.json'}: not written by fulltune interpolate (JSONDecodeError: "
        )
    )
    (tmp_path / "final").mkdir()
    (tmp_path / "results.json").write_text("[1, 2")  # the blended run's own file, cut short
    (tmp_path / "interpolate.json").write_text(
        json.dumps({"theta0": "default", "finetuned": str(tmp_path / "final"), "rows": [{"alpha": 0.5}]})
    )
    assert main(["compare", str(tmp_path)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(f"fulltune: error: {tmp_path / 'results.json'}: not a run's results.json (JSONDecodeError: ")
    )


def test_each_probe_column_names_its_unit():
    """Rows of a results.json from before per-item records (change as a fraction, no interval)."""
    forgetting = {
        "humaneval": {"metric": "nll_per_token", "before": 1.0, "after": 1.1, "change": 0.1},
        "arc_easy": {"metric": "acc", "before": 0.5, "after": 0.46, "change": -0.04},
    }
    row = _row(
        "r",
        {"accuracy": 0.8},
        {"accuracy": 0.5},
        {"probes": forgetting},
        val_loss=None,
        distance=None,
        peak_gb=None,
        time_s=None,
    )
    assert row["probes"] == pytest.approx({"humaneval": -10.0, "arc_easy": -4.0}) and row[
        "forgetting"
    ] == pytest.approx(10.0)
    assert markdown([row]).splitlines()[0] == (
        "| run | task acc % | task gain [95 % CI] | val loss | Δ arc_easy (points) [95 % CI] | "
        "Δ humaneval (−% NLL) [95 % CI] | ‖θ−θ0‖ | peak GB | time s |"
    )
    assert markdown([row]).splitlines()[2].split(" | ")[4:6] == ["-4.0", "-10.0"]  # no interval to show
