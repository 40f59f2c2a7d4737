"""RUN/report.html: written at the end of a run and by `fulltune report`, self-contained (plotly's JS
inlined once, nothing fetched), its charts built from the run's own numbers, and opened by headless
Chromium as a person would: every chart renders, no console message."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl

from fulltune.cli import main
from fulltune.report import forgetting_figures, memory_figure, read_run, training_figures

MC = [
    {"context": "the movie was", "choices": [" great fun", " dull"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good"], "gold": 1},
]


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = write_jsonl(tmp / "chat.jsonl", sentiment_records(24))
    out = tmp / "run"
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
                        "train.max_steps": 4,
                        "train.report": True,
                        "optim.layer_lr_decay": 1.5,
                        "data.val_fraction": 0.2,
                        "train.val_interval": 2,
                        "eval.task_file": write_jsonl(tmp / "task.jsonl", sentiment_records(6, seed=3)),
                        "eval.labels": "[positive, negative]",
                        "eval.probes": f"[mc:{write_jsonl(tmp / 'mc.jsonl', MC)}]",
                        "eval.probe_interval": 2,
                    },
                ),
            ]
        )
        == 0
    )
    return out


def test_the_report_is_written_at_the_end_and_self_contained(finished):
    page = (finished / "report.html").read_text()
    assert page.count("plotly.js v") == 1  # the library, inlined once
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)  # nothing fetched (Chromium below opens it offline)
    assert [int(i) for i in re.findall(r'id="chart-(\d+)"', page)] == list(range(8))  # drift included
    assert "Partial report" not in page and "task accuracy θ0 → θ*" in page and "Resolved config" in page


def test_the_charts_hold_the_runs_numbers(finished):
    run = read_run(finished)
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    loss, lr, norm, _ = training_figures(run)
    assert list(loss.data[0].y) == [r["loss"] for r in rows if "loss" in r]
    assert list(loss.data[1].x) == [r["step"] for r in rows if "val_loss" in r] and len(loss.data[1].x) >= 2
    steps = [r for r in rows if "loss" in r]
    assert [t.name for t in lr.data] == list(steps[0]["lr"]) and list(lr.data[-1].y) == [r["lr"]["head"] for r in steps]
    results = run["results"]
    mem = memory_figure(results)
    assert sum(b.y[0] for b in mem.data if b.x[0] == "predicted") == pytest.approx(
        sum(results["memory"]["predicted_terms_gb"].values())
    )
    assert sum(b.y[0] for b in mem.data if b.x[0] == "measured") == pytest.approx(
        max(results["memory"]["measured_peak_gb"], sum(results["state_memory"]["measured_per_rank_gb"][0].values()))
    )
    drift, during, change = forgetting_figures(run)
    kl = [(r["step"], r["kl_task"]) for r in rows if "kl_task" in r]  # the drift from θ0 at each validation point
    assert kl and list(zip(drift.data[0].x, drift.data[0].y)) == kl
    mc = results["forgetting"]["probes"]["mc"]
    assert list(during.data[0].x) == [2, 4]  # the probe interval, θ*: each paired with θ0's records
    assert during.data[0].y[-1] == pytest.approx(mc["change"])  # θ*'s change, as in results.json
    assert during.data[0].error_y.array[-1] == pytest.approx(mc["ci95"][1] - mc["change"])
    task = 100 * (results["task_accuracy_final"]["accuracy"] - results["task_accuracy_theta0"]["accuracy"])
    assert change.data[0].x[0] == "task accuracy" and change.data[0].y[0] == pytest.approx(task)
    assert change.data[0].y[1] == pytest.approx(mc["change"])
    assert change.data[0].error_y.arrayminus[1] == pytest.approx(mc["change"] - mc["ci95"][0])


def test_chromium_renders_every_chart_without_a_console_message(finished, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: scripts/test.sh installs it (apt-get install chromium)"
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (finished / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ":CONSOLE" not in proc.stderr, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    charts = re.split(r'id="chart-\d+"', proc.stdout)[1:]
    assert len(charts) == 8 and all("main-svg" in c for c in charts)  # plotly drew each one


def test_an_interrupted_run_gets_a_partial_report_and_a_non_run_one_line(capsys, finished, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    (partial / "results.json").unlink()
    (partial / "report.html").unlink()
    with open(partial / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 1.')  # torn by a kill
    assert main(["report", str(partial)]) == 0
    page = (partial / "report.html").read_text()
    assert "Partial report: the run is in progress or was interrupted" in page and 'id="chart-3"' in page
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"fulltune: error: {tmp_path / 'nothing'}: not a fulltune run directory (no config.yaml)"
    )


def test_the_run_ends_with_a_summary(capsys, finished, tiny_dir, chat_file, tmp_path):
    from fulltune.report import summary_lines

    results = json.loads((finished / "results.json").read_text())
    lines = summary_lines(results)
    t0, t1 = results["task_accuracy_theta0"]["accuracy"], results["task_accuracy_final"]["accuracy"]
    p = results["forgetting"]["probes"]["mc"]
    assert [line.split()[0] for line in lines] == ["time", "tokens", "peak", "task", "largest"]
    task = results["forgetting"]["task"]
    assert lines[3].endswith(
        f"{100 * t0:.1f}% → {100 * t1:.1f}%, {100 * (t1 - t0):+.1f} points "
        f"[{task['ci95'][0]:+.1f}, {task['ci95'][1]:+.1f}], p={task['p']:.2f}, {task['verdict']} (n={task['n']})"
    )
    assert f"mc {p['change']:+.1f} points [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}], p=" in lines[4]
    capsys.readouterr()
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *tiny_overrides(tiny_dir, chat_file, out, **{"train.max_steps": 1}),
                "eval.task_file=",
                "data.val_fraction=0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    start = printed.index("[train] summary")
    assert printed[start + 1 :] == summary_lines(json.loads((out / "results.json").read_text()))


def test_final_carries_a_model_card_with_the_runs_own_numbers(finished):
    """RUN/final/README.md: Hub metadata, the data's counts, the task's paired change, each probe's
    interval and verdict, the hardware, the time and the whole recipe, all read from the run's files,
    and in final/'s manifest (a changed card fails verify)."""
    import yaml

    from fulltune.atomic import verify_dir
    from fulltune.evals.forgetting import describe_change
    from fulltune.report import task_change

    results = json.loads((finished / "results.json").read_text())
    card = (finished / "final" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert (
        meta["library_name"] == "transformers" and "fulltune" in meta["tags"] and "base_model" not in meta
    )  # a local path
    metric = meta["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "accuracy", "value": round(100 * results["task_accuracy_final"]["accuracy"], 2),
                      "name": "task accuracy (%)"}  # fmt: skip
    train = results["data"]["train"]
    assert f"{train['kept']:,} of {train['records']:,} records kept, {train['tokens']:,} tokens" in card
    assert f"θ0 → fine-tuned: {task_change(results)}" in card
    for name, row in results["forgetting"]["probes"].items():
        assert f"| {name} | " in card and describe_change(row) in card
    assert f"{results['train_time_s']:.0f} s of training, {results['steps']} steps" in card and "cores; flags" in card
    assert (finished / "config.yaml").read_text().rstrip() in card and "fulltune train config.yaml" in card
    assert verify_dir(finished / "final") is None
    manifest = json.loads((finished / "final" / "fulltune-manifest.json").read_text())["files"]
    assert manifest["README.md"]["bytes"] == len(card.encode())
