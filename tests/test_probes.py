"""General-skill probes: scores equal a hand computation; built-in subsets are fixed; reports add up."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import sentiment_records, tiny_overrides, write_jsonl

from fulltune.cli import main
from fulltune.config import ModelConfig, load_config
from fulltune.evals import paired
from fulltune.evals.classify import score_sequences
from fulltune.evals.forgetting import forgetting_report
from fulltune.evals.probes import load_probe, probe_examples, summarise
from fulltune.model import load_theta0
from fulltune.train import run_training

MC = [
    {
        "context": "Question: what is the capital of france?\nAnswer:",
        "choices": [" paris", " the movie", " good"],
        "gold": 0,
    },
    {"context": "the plot was", "choices": [" dull", " great fun and good"], "gold": 1},
]
TEXT = [{"context": "the movie was", "continuation": " great fun"}, {"text": "positive review of the film"}]


def _by_hand(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context)["input_ids"] if context else [tokenizer.bos_token_id]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont))


def test_choice_loglikelihood_equals_log_softmax_by_hand(tiny_dir, tmp_path):
    model, tok, _ = load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    probe = load_probe(f"mc:{write_jsonl(tmp_path / 'mc.jsonl', MC)}", n=0)
    examples = probe_examples(probe, tok)
    scores = score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=2, autocast=contextlib.nullcontext)
    hand = [_by_hand(model, tok, it["context"], c) for it in MC for c in it["choices"]]
    assert scores == pytest.approx(hand, rel=1e-5)
    summary = summarise(probe, examples, scores)
    best = [max(range(3), key=hand[:3].__getitem__), max(range(2), key=hand[3:].__getitem__)]
    assert summary["acc"] == sum(int(b == it["gold"]) for b, it in zip(best, MC)) / 2


def test_text_probe_nll_and_bits_per_byte_by_hand(tiny_dir, tmp_path):
    model, tok, _ = load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    probe = load_probe(f"text:{write_jsonl(tmp_path / 't.jsonl', TEXT)}", n=0)
    examples = probe_examples(probe, tok)
    summary = summarise(
        probe,
        examples,
        score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=4, autocast=contextlib.nullcontext),
    )
    hand = [
        _by_hand(model, tok, "the movie was", " great fun"),
        _by_hand(model, tok, "", "positive review of the film"),
    ]
    n_tokens = len(tok(" great fun", add_special_tokens=False)["input_ids"]) + len(
        tok("positive review of the film", add_special_tokens=False)["input_ids"]
    )
    assert summary["nll_per_token"] == pytest.approx(-sum(hand) / n_tokens, rel=1e-5)
    assert summary["bits_per_byte"] == pytest.approx(
        -sum(hand) / math.log(2) / len(" great funpositive review of the film"), rel=1e-5
    )


def test_per_token_normalisation_can_change_the_answer():
    probe = load_probe.__globals__["Probe"]("p", "mc", [{"context": "c", "choices": ["a", "b"], "gold": 1}])
    from fulltune.data.formats import Example

    examples = [Example([1, 2], [0, 1]), Example([1, 2, 3, 4], [0, 1, 1, 1])]  # 1 vs 3 continuation tokens
    summary = summarise(probe, examples, [-2.0, -3.0])  # raw picks a; per token (-2 vs -1) picks b
    assert summary["acc"] == 0.0 and summary["acc_per_token"] == 1.0


def test_builtin_probes_are_fixed_subsets_of_the_real_files():
    arc = load_probe("arc_easy", 5)
    assert len(arc.items) == 5 and all(len(it["choices"]) == 4 and 0 <= it["gold"] < 4 for it in arc.items)
    assert arc.items == load_probe("arc_easy", 5).items
    assert all(it["context"].startswith("Question:") for it in arc.items)
    assert len(load_probe("piqa", 0).items) == 1838  # unconditioned doc_id ≥ 1e6 requests skipped
    code = load_probe("humaneval", 3)
    assert all(it["context"].lstrip().startswith(("def ", "from", "import")) for it in code.items)
    assert all(it["continuation"].startswith("    ") for it in code.items)


def test_unknown_probe_and_bad_item_are_clear_errors(tmp_path):
    from fulltune.errors import UserError

    with pytest.raises(UserError, match="unknown probe 'trivia'"):
        load_probe("trivia", 5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a"], "gold": 3}])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: a multiple-choice probe item needs"):
        load_probe(f"mc:{bad}", 5)


def test_forgetting_report_retention_and_change():
    before = {
        "arc": {"kind": "mc", "acc": 0.5, "acc_stderr": 0.05, "n": 100},
        "code": {"kind": "text", "nll_per_token": 2.0, "bits_per_byte": 1.0, "n": 10},
    }
    after = {
        "arc": {"kind": "mc", "acc": 0.4, "acc_stderr": 0.049, "n": 100},
        "code": {"kind": "text", "nll_per_token": 2.5, "bits_per_byte": 1.25, "n": 10},
    }
    rows = forgetting_report(before, after)["probes"]
    assert rows["arc"]["retention"] == pytest.approx(0.8) and rows["arc"]["change"] == pytest.approx(-10.0)
    assert rows["code"]["change"] == pytest.approx(25.0) and rows["code"]["unit"] == "%"
    assert rows["arc"]["ci95"] is None and rows["arc"]["verdict"].startswith("not paired")  # no per-item records


def test_training_runs_probes_before_during_after(tiny_dir, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    text = write_jsonl(tmp_path / "t.jsonl", TEXT)
    task = write_jsonl(tmp_path / "task.jsonl", sentiment_records(6, seed=3))
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    run_training(
        load_config(
            None,
            tiny_overrides(
                tiny_dir,
                data,
                tmp_path / "r",
                **{
                    "train.max_steps": 4,
                    "eval.probes": f"[mc:{mc}, text:{text}]",
                    "eval.probe_interval": 2,
                    "eval.task_file": str(task),
                    "eval.labels": "[positive, negative]",
                },
            ),
        )
    )
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    report = results["forgetting"]
    assert set(report["probes"]) == {"mc", "t"} and "task" in report
    assert report["probes"]["mc"]["before"] == results["probes_theta0"]["mc"]["acc"]
    assert report["probes"]["t"]["after"] == results["probes_final"]["t"]["nll_per_token"]
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "probes" in r] == [0, 2, 4]


def test_eval_command_compares_two_models(capsys, tiny_dir, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "e.json"
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "r", **{"train.max_steps": 2})))
    assert (
        main(
            [
                "eval",
                str(tiny_dir),
                str(tmp_path / "r" / "final"),
                "--probes",
                f"mc:{mc}",
                "--out",
                str(out),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved) == {str(tiny_dir), str(tmp_path / "r" / "final")}
    before, after = (saved[m]["mc"]["items"]["correct"] for m in (str(tiny_dir), str(tmp_path / "r" / "final")))
    change = paired.accuracy_change(before, after)  # the change column: paired on the saved per-item outcomes
    line = next(x for x in text.splitlines() if x.startswith("mc "))
    assert line.endswith(f"{change['change']:+.1f} points [{change['ci95'][0]:+.1f}, {change['ci95'][1]:+.1f}], "
                         f"p={change['p']:.2f}, {change['verdict']}")  # fmt: skip
