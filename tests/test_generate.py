"""`fulltune generate` and `fulltune chat` on the tiny model: greedy is deterministic and equals
transformers' own greedy decoding of the chat-template prompt; --compare answers with a second
model; a chat keeps its history; a tokenizer without a template falls back to plain completion."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer

from fulltune.cli import main
from fulltune.commands.generate import run_chat_command


def _greedy(model_dir, messages, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _untied(tmp_path_factory, seed: int):
    """A tiny model with untied embeddings (a tied random one only echoes its last token) and the test tokenizer."""
    path = tmp_path_factory.mktemp(f"untied{seed}")
    tok = make_tokenizer()
    make_model(len(tok), tie=False, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _untied(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Other random weights: answers differ from tiny_dir's."""
    return _untied(tmp_path_factory, 7)


def test_generate_is_greedy_and_deterministic_and_compares(capsys, tiny_dir, other_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "the movie was"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "classify the plot"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    args = [
        "generate",
        str(tiny_dir),
        "--file",
        str(prompts),
        "--prompt",
        "what is the capital of france",
        "--max-new-tokens",
        "12",
        "--compare",
        str(other_dir),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == [
        "what is the capital of france",
        "the movie was",
        "classify the plot",
    ]
    for r in rows:
        assert r["output"] == _greedy(tiny_dir, r["messages"], 12) != ""
        assert r["compare_model"] == str(other_dir) and r["compare_output"] == _greedy(other_dir, r["messages"], 12)
    assert any(r["output"] != r["compare_output"] for r in rows)
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first  # greedy: the same answers again


def test_sampling_is_seeded(tiny_dir, tmp_path):
    outputs = []
    for i, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"{i}.jsonl"
        assert (
            main(
                [
                    "generate",
                    str(tiny_dir),
                    "--prompt",
                    "the movie",
                    "--temperature",
                    "1.5",
                    "--seed",
                    str(seed),
                    "--max-new-tokens",
                    "16",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outputs.append(json.loads(out.read_text())["output"])
    assert outputs[0] == outputs[1] != outputs[2]


def test_chat_keeps_the_conversation_and_resets(capsys, tiny_dir):
    lines = iter(["the movie was", "and the plot", "/reset", "and the plot", "/exit"])
    args = SimpleNamespace(
        model=str(tiny_dir), compare=None, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0, system=None
    )
    said = run_chat_command(args, read=lambda prompt: next(lines))  # every conversation, as it went
    first = [{"role": "user", "content": "the movie was"}]
    second = first + [
        {"role": "assistant", "content": _greedy(tiny_dir, first, 6)},
        {"role": "user", "content": "and the plot"},
    ]
    again = [{"role": "user", "content": "and the plot"}]
    assert said == [
        second + [{"role": "assistant", "content": _greedy(tiny_dir, second, 6)}],
        again + [{"role": "assistant", "content": _greedy(tiny_dir, again, 6)}],
    ]
    out = capsys.readouterr().out
    for conversation in said:  # streamed as it was generated
        for turn in conversation[1::2]:
            assert f"{tiny_dir}> {turn['content']}" in out


def test_a_model_without_a_chat_template_completes_plain_text(capsys, tiny_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["generate", str(model), "--prompt", "the movie was", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert (
        f"[generate] {model}: the tokenizer has no chat template: plain completion of the prompt text" in captured.err
    )
    assert json.loads(captured.out.strip().splitlines()[-1])["output"]


@pytest.mark.parametrize(
    "args, line",
    [
        (["--max-new-tokens", "0", "--prompt", "x"], "--max-new-tokens must be ≥ 1"),
        ([], "no prompts: give --prompt TEXT or --file prompts.jsonl"),
        (["--file", "/nope.jsonl"], "--file /nope.jsonl: not found"),
    ],
)
def test_bad_generate_arguments_are_one_line(capsys, tiny_dir, args, line):
    assert main(["generate", str(tiny_dir), *args]) == 2
    assert capsys.readouterr().err.strip() == f"fulltune: error: {line}"
