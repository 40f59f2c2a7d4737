"""Per-item records in the run directory, paired changes in results.json, what the probes can detect,
θ0's scores cached across runs (hit, miss, damaged entry), and a null run that changes nothing."""

from __future__ import annotations

import json

import pytest
from conftest import sentiment_records, tiny_overrides, write_jsonl

from fulltune.config import load_config
from fulltune.evals import paired, records
from fulltune.train import run_training

MC = [
    {"context": "the movie was", "choices": [" great fun", " dull"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good", " long"], "gold": 1},
    {"context": "what is the capital of france", "choices": [" paris", " the film"], "gold": 0},
    {"context": "the actors were", "choices": [" wooden", " superb"], "gold": 1},
]
TEXT = [{"text": "the movie was great fun and the plot was good"}, {"context": "capital:", "continuation": " paris"}]


def _train(tiny_dir, tmp_path, out, capsys=None, **extra) -> tuple[dict, str]:
    files = {
        "data": write_jsonl(tmp_path / "d.jsonl", sentiment_records(16)),
        "mc": write_jsonl(tmp_path / "mc.jsonl", MC),
        "text": write_jsonl(tmp_path / "t.jsonl", TEXT),
        "task": write_jsonl(tmp_path / "task.jsonl", sentiment_records(10, seed=3)),
    }
    settings = {
        "train.max_steps": 4,
        "eval.probes": f"[mc:{files['mc']}, text:{files['text']}]",
        "eval.probe_interval": 2,
        "eval.task_file": str(files["task"]),
        "eval.labels": "[positive, negative]",
        **extra,
    }
    if capsys is not None:
        capsys.readouterr()
    run_training(load_config(None, tiny_overrides(tiny_dir, files["data"], out, **settings)))
    printed = capsys.readouterr().out if capsys is not None else ""
    return json.loads((out / "results.json").read_text()), printed


def test_a_run_keeps_each_items_outcome_and_pairs_them(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r"
    results, printed = _train(tiny_dir, tmp_path, out, capsys)
    assert records.steps(out) == [0, 2, 4]  # θ0, the probed step, θ*
    for step in (0, 2, 4):
        rec = records.read(out, step)
        mc, text = rec["probes"]["mc"], rec["probes"]["t"]
        assert len(mc["correct"]) == len(mc["margin"]) == len(mc["gold_logprob"]) == len(MC)
        assert all(lp <= 0 for lp in mc["gold_logprob"]) and len(text["nll"]) == len(TEXT) == len(text["tokens"])
        assert len(rec["task"]["correct"]) == 10 if step != 2 else "task" not in rec  # mid-run: only with a budget
        # the margin is the gold's log-probability minus the best wrong one's: positive exactly when correct
        assert [int(m > 0) for m in mc["margin"]] == mc["correct"]
    first, last = records.read(out, 0), records.read(out, 4)
    acc0 = sum(first["probes"]["mc"]["correct"]) / len(MC)
    assert (
        results["probes_theta0"]["mc"]["acc"] == pytest.approx(acc0) and "items" not in results["probes_theta0"]["mc"]
    )
    row = results["forgetting"]["probes"]["mc"]
    assert row == {**row, **{k: v for k, v in paired.accuracy_change(first["probes"]["mc"]["correct"],
                                                                       last["probes"]["mc"]["correct"]).items()
                              if k not in ("unit", "before", "after", "n")}}  # fmt: skip
    text_row = results["forgetting"]["probes"]["t"]
    assert text_row["ci95"][0] <= text_row["change"] <= text_row["ci95"][1] and text_row["verdict"] in (
        paired.LOST, paired.GAINED, paired.NONE)  # fmt: skip
    assert results["forgetting"]["task"]["n"] == 10 and "p" in results["forgetting"]["task"]
    assert set(results["detectable"]) == {"mc", "t"} and results["detectable"]["mc"]["n"] == len(MC)
    assert "[detect] what these probes can detect" in printed and "[forgetting] general skills" in printed
    assert " [" in printed.split("[forgetting]")[1].splitlines()[1]  # the probe line carries its interval


def test_a_null_run_detects_no_change(tiny_dir, tmp_path):
    """A learning rate too small to change any answer: every probe and the task say no detectable change."""
    results, _ = _train(tiny_dir, tmp_path, tmp_path / "null", **{"optim.lr": 1e-12, "train.max_steps": 2})
    rows = results["forgetting"]["probes"]
    assert {name: r["verdict"] for name, r in rows.items()} == {"mc": paired.NONE, "t": paired.NONE}
    assert rows["mc"]["lost_items"] == rows["mc"]["gained_items"] == 0 and rows["mc"]["p"] == 1.0
    assert rows["mc"]["signal"]["verdict"] == paired.NONE and results["forgetting"]["task"]["verdict"] == paired.NONE


def test_theta0_scores_are_cached_across_runs(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FULLTUNE_HOME", str(tmp_path / "home"))
    first, printed = _train(tiny_dir, tmp_path, tmp_path / "a", capsys, **{"eval.theta0_cache": True})
    assert "not scored again" not in printed
    entries = sorted((tmp_path / "home" / "theta0-scores").glob("*.json"))
    assert len(entries) == 3  # the task's and the probes' entries, and the model files' digests
    second, printed = _train(tiny_dir, tmp_path, tmp_path / "b", capsys, **{"eval.theta0_cache": True})
    assert printed.count("from an earlier run on the same θ0") == 2  # task and probes: the θ0 pass is gone
    assert second["probes_theta0"]["mc"]["acc"] == first["probes_theta0"]["mc"]["acc"]
    assert second["task_accuracy_theta0"]["accuracy"] == first["task_accuracy_theta0"]["accuracy"]
    assert records.read(tmp_path / "b", 0)["probes"] == records.read(tmp_path / "a", 0)["probes"]
    # another precision, or other items, miss the cache
    _, printed = _train(tiny_dir, tmp_path, tmp_path / "c", capsys, **{"eval.theta0_cache": True,
                                                                        "eval.probe_items": 3})  # fmt: skip
    assert printed.count("from an earlier run on the same θ0") == 1  # the task's entry still matches
    _, printed = _train(tiny_dir, tmp_path, tmp_path / "d", capsys, **{"eval.theta0_cache": True,
                                                                        "train.precision": "bf16-mixed"})  # fmt: skip
    assert "from an earlier run on the same θ0" not in printed
    # a damaged entry is ignored with one line and scored again
    for entry in (tmp_path / "home" / "theta0-scores").glob("*.json"):
        if entry.name != "file-digests.json":
            entry.write_text('{"key": "trunc')
    _, printed = _train(tiny_dir, tmp_path, tmp_path / "e", capsys, **{"eval.theta0_cache": True})
    assert printed.count("ignoring a damaged cache of θ0's scores") >= 2 and "not scored again" not in printed


def test_a_changed_model_misses_the_cache(tiny_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("FULLTUNE_HOME", str(tmp_path / "home"))
    copy = tmp_path / "model"
    shutil.copytree(tiny_dir, copy)
    digest = records.model_digest(copy)
    assert records.model_digest(copy) == digest  # unchanged: the same digest (remembered, not rehashed)
    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")  # one byte more: another model as far as the cache knows
    assert records.model_digest(copy) != digest
    gguf = tmp_path / "m.gguf"  # a model given as one file (a .gguf) is hashed as that file
    gguf.write_bytes(b"GGUF one")
    first = records.model_digest(gguf)
    gguf.write_bytes(b"GGUF two!")
    assert records.model_digest(gguf) != first and first != records.model_digest(copy)
    key = dict(what=["probes", []], precision="fp32", device="cpu", batch_size=16)
    assert records.theta0_key(model_digest="a", **key) != records.theta0_key(model_digest="b", **key)
    assert records.theta0_key(model_digest="a", **key) != records.theta0_key(
        model_digest="a", **{**key, "precision": "bf16"}
    )
