"""`fulltune eval MODEL --against THETA0 --lm-eval TASKS`: EleutherAI's harness (the real package) runs
offline on local items, pairs the two models item by item, and agrees with fulltune's own probe on
the same items; a user's own lm-eval YAML runs as it is; what cannot run is one line."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides, write_jsonl

from fulltune.cli import main

WORDS = ["the movie was", "the plot was", "the music was", "the acting was", "the ending was", "the film was"]
ITEMS = [{"context": w, "choices": [" great fun", " dull", " good"], "gold": i % 3} for i, w in enumerate(WORDS)]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # lm-eval's json builder caches here


def test_two_models_are_paired_and_fulltunes_probe_agrees_on_every_item(capsys, tiny_dir, tmp_path):
    items = write_jsonl(tmp_path / "mine.jsonl", ITEMS)
    out = tmp_path / "eval.json"
    args = ["eval", str(tiny_dir), "--against", str(tiny_dir), "--lm-eval", f"mc:{items}", "--out", str(out)]
    assert main([*args, "--precision", "fp32"]) == 0
    results = json.loads(out.read_text())
    a, b = (results[str(tiny_dir)]["mine"],) * 2
    assert a["n"] == len(ITEMS) and len(a["items"]["correct"]) == len(ITEMS)
    assert a["acc"] == pytest.approx(sum(a["items"]["correct"]) / len(ITEMS))
    # fulltune's probe on the same items: the same tokens here (no special tokens to add), so every item agrees
    assert a["fulltune"]["agree"] == 1.0 and a["fulltune"]["acc"] == pytest.approx(a["acc"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mine "))
    assert f"{100 * b['acc']:.1f}% (ours {100 * b['acc']:.1f}%, agree 100%)" in line
    assert "+0.0 points" in line and "no detectable change" in line  # the same model twice: paired, nothing moved


def test_a_users_own_lm_eval_yaml_runs_as_it_is(tiny_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "qa.jsonl", [{"q": r["context"], "opts": r["choices"], "y": r["gold"]} for r in ITEMS]
    )
    task = tmp_path / "my_task.yaml"
    task.write_text(
        "task: my_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{opts}}"\ndoc_to_target: "{{y}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_dir), "--lm-eval", str(task), "--out", str(out), "--precision", "fp32"]) == 0
    result = json.loads(out.read_text())[str(tiny_dir)]["my_task"]
    assert result["n"] == len(ITEMS) and "fulltune" not in result  # no fulltune probe for a foreign task


def test_what_cannot_run_is_one_line(capsys, tiny_dir, tmp_path, monkeypatch):
    assert main(["eval", str(tiny_dir), "--lm-eval", "winogrande"]) == 2
    err = capsys.readouterr().err
    assert err.count("fulltune: error:") == 1 and "--lm-eval: unknown task 'winogrande'" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", str(tiny_dir), "--lm-eval", "arc_easy"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("fulltune: error: --lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'fulltune[lmeval]'")
    )


def test_an_lmeval_probe_in_training_is_paired_and_scores_as_ours(tiny_dir, chat_file, tmp_path):
    """eval.probes lmeval:arc_easy beside arc_easy: the same items, each choice scored by lm-eval, so
    θ0's per-item records match ours (log-likelihoods to float noise) and the forgetting table pairs it."""
    from fulltune.config import load_config
    from fulltune.evals import records
    from fulltune.train import run_training

    out = tmp_path / "run"
    extra = {"train.max_steps": 2, "eval.probes": "[arc_easy, lmeval:arc_easy]", "eval.probe_items": 6}
    run_training(load_config(None, tiny_overrides(tiny_dir, chat_file, out, **extra) + ["eval.task_file="]))
    theta0 = records.read(out, 0)["probes"]
    ours, theirs = theta0["arc_easy"], theta0["lmeval:arc_easy"]
    assert ours["correct"] == theirs["correct"] and len(ours["correct"]) == 6
    assert theirs["gold_logprob"] == pytest.approx(ours["gold_logprob"], rel=1e-4)
    row = json.loads((out / "results.json").read_text())["forgetting"]["probes"]["lmeval:arc_easy"]
    assert row["ci95"] is not None and row["verdict"] in ("lost", "gained", "no detectable change")


def test_lm_eval_scores_under_the_runs_autocast(tiny_dir):
    """bf16-mixed reaches lm-eval's forward passes: HFLM's own autocast context, enabled only with its
    mixed_precision_dtype, switched ours off, so a bf16-mixed run was scored in fp32."""
    import contextlib
    import functools

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fulltune.evals import lmeval

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    bf16 = functools.partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    assert lmeval.autocast_dtype(bf16, "cpu") is torch.bfloat16
    assert lmeval.autocast_dtype(contextlib.nullcontext, "cpu") is None
    fp32 = lmeval.candidate_logliks(model, tokenizer, ITEMS, batch_size=4, autocast=contextlib.nullcontext)
    mixed = lmeval.candidate_logliks(model, tokenizer, ITEMS, batch_size=4, autocast=bf16)
    assert mixed != fp32 and mixed == pytest.approx(fp32, rel=5e-2)  # bf16's rounding, not another model
