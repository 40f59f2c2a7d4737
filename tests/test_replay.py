"""Self-distilled replay (data.replay, data/replay.py): θ0's own greedy answers, cached, mixed in."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import WORDS, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fulltune.config import load_config
from fulltune.data import replay
from fulltune.errors import UserError
from fulltune.evals.probes import load_probe

PROMPTS = [
    {"prompt": "what is the capital of france"},
    {"prompt": "classify the movie"},
    {"messages": [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "the plot was"}]},
    {"prompt": "review of the film and the actors was good fun and the plot was slow"},
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lively_dir(tiny_dir, tmp_path_factory):
    """The tiny model with its matrices ×10, so its greedy answers depend on the prompt (the random
    init repeats one token whatever it is given), and token 257 as a second end token (the init never
    says EOS): answers that end at different steps of one batch."""
    path = tmp_path_factory.mktemp("lively")
    model, tok = _load(tiny_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0 if p.dim() == 2 else 1.0)
    model.generation_config.eos_token_id = [tok.eos_token_id, LIVELY_END]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


LIVELY_END = 257


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cfg(model_dir, tmp_path, **extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(8))
    general = write_jsonl(tmp_path / "g.jsonl", [{"text": " ".join(WORDS[:12])}])  # one passage: general index 0
    extra = {
        "data.replay": f"[{prompts}]",
        "data.general": f"[{general}]",  # a general passage beside the replay: general index 0
        "data.mix_ratio": 0.25,
        "data.replay_max_new_tokens": 6,
        **extra,
    }
    return load_config(None, tiny_overrides(model_dir, data, tmp_path / "run", **extra))


def _load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().train()  # as load_theta0 leaves it
    return model, AutoTokenizer.from_pretrained(model_dir)


def _answers(cfg, model, tok):
    prompts = replay.read_prompts(cfg)
    return replay.replay_examples(cfg, prompts, model, tok, device=CPU, precision="fp32")


def _greedy(model, tok, messages, n: int) -> tuple[list[int], list[int]]:
    """The prompt's tokens and θ0's greedy answer, one token at a time, no cache, no padding."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in (tok.eos_token_id, LIVELY_END):
                break
    return prompt, ids[len(prompt) :]


def test_replay_sequences_are_theta0s_own_greedy_answers_with_loss_on_the_answer_only(lively_dir, tmp_path, home):
    cfg = _cfg(lively_dir, tmp_path)
    model, tok = _load(lively_dir)
    examples, stats = _answers(cfg, model, tok)
    assert len(examples) == stats["sequences"] == stats["prompts"] == len(PROMPTS)
    assert model.training  # its mode restored
    conversations = replay.read_prompts(cfg)
    assert conversations[2][0]["role"] == "system" and conversations[0] == [
        {"role": "user", "content": PROMPTS[0]["prompt"]}
    ]
    for ex, messages in zip(examples, conversations):
        prompt, answer = _greedy(model, tok, messages, 6)
        assert ex.input_ids == prompt + answer  # batched and left-padded, yet the same tokens
        assert ex.target_mask == [0] * len(prompt) + [1] * len(answer)
    rows = [json.loads(line) for line in replay.cache_path(stats["cache_key"]).read_text().splitlines()[1:]]
    assert [r["messages"][:-1] for r in rows] == conversations
    assert rows[0]["messages"][-1] == {
        "role": "assistant",
        "content": tok.decode(rows[0]["answer_ids"], skip_special_tokens=True),
    }
    assert stats["generated_tokens"] == sum(len(r["answer_ids"]) for r in rows)
    answers = [r["answer_ids"] for r in rows]
    assert len({tuple(a) for a in answers}) >= 3  # the answers depend on the prompt
    assert [r["finished"] for r in rows] == [a[-1] == LIVELY_END for a in answers]
    assert 0 < stats["stopped_by_itself"] < len(rows) and len({len(a) for a in answers}) > 1  # some end early


def test_the_cache_is_hit_on_a_second_call_and_missed_when_the_key_changes(
    tiny_dir, tmp_path, home, monkeypatch, capsys
):
    cfg = _cfg(tiny_dir, tmp_path)
    model, tok = _load(tiny_dir)
    first, stats = _answers(cfg, model, tok)
    assert "θ0 answered 4 prompts greedily" in capsys.readouterr().out
    real = replay.generate

    def refuse(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(replay, "generate", refuse)
    again, hit = _answers(cfg, model, tok)
    assert again == first and hit["cache_key"] == stats["cache_key"]
    out = capsys.readouterr().out
    assert f"θ0's answers to 4 prompts read from {replay.cache_path(stats['cache_key'])} (saved" in out
    calls = []
    monkeypatch.setattr(replay, "generate", lambda *a, **k: calls.append(k["max_new_tokens"]) or real(*a, **k))
    longer, other = _answers(_cfg(tiny_dir, tmp_path, **{"data.replay_max_new_tokens": 3}), model, tok)
    assert calls == [3] and other["cache_key"] != stats["cache_key"]
    changed = tmp_path / "changed-model"
    shutil.copytree(tiny_dir, changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] += 1.0
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    _, moved = _answers(_cfg(changed, tmp_path), *_load(changed))
    assert calls == [3, 6] and moved["cache_key"] not in (stats["cache_key"], other["cache_key"])
    assert len(list((home / "replay").glob("*.jsonl"))) == 3


@pytest.mark.parametrize("damage", ["truncated", "another prompt", "not json"])
def test_a_damaged_cache_is_said_once_and_generated_again(tiny_dir, tmp_path, home, capsys, damage):
    cfg = _cfg(tiny_dir, tmp_path)
    model, tok = _load(tiny_dir)
    first, stats = _answers(cfg, model, tok)
    path = replay.cache_path(stats["cache_key"])
    lines = path.read_text().splitlines()
    if damage == "truncated":
        path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    elif damage == "another prompt":
        row = json.loads(lines[1])
        row["messages"][0]["content"] = "something else"
        path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    else:
        path.write_text("garbage\n")
    capsys.readouterr()
    again, _ = _answers(cfg, model, tok)
    out = capsys.readouterr().out
    assert again == first
    assert out.count("ignoring a damaged cache") == 1 and "θ0 answered 4 prompts greedily" in out
    assert path.read_text().splitlines()[1:] == lines[1:]  # written whole again


def test_a_run_mixes_the_replay_sequences_in(tiny_dir, tmp_path, home, monkeypatch):
    from fulltune.run_setup import Run
    from fulltune.train import run_training

    cfg = _cfg(tiny_dir, tmp_path, **{"data.mix_ratio": 0.5, "train.max_steps": 4})
    drawn = []
    examples = Run.examples
    monkeypatch.setattr(
        Run, "examples", lambda run, idx: drawn.extend(i - len(run.data.train) for i in idx) or examples(run, idx)
    )
    run_training(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["data"]["replay"]["sequences"] == len(PROMPTS)
    assert results["mixing"]["general_sequences"] == results["mixing"]["task_sequences"] == 16
    assert {j for j in drawn if j >= 1} <= set(range(1, 1 + len(PROMPTS)))  # θ0's answers, after the one passage
    assert len({j for j in drawn if j >= 1}) >= 2


def test_builtin_prompts_never_overlap_the_probe_items(tmp_path):
    cfg = load_config(None, ["data.replay=[builtin:arc_easy, builtin:sciq]", "data.replay_items=60",
                             "data.mix_ratio=0.1", "data.general=[builtin:lambada]", "eval.probes=[arc_easy]",
                             "eval.probe_items=50"])  # fmt: skip
    prompts = replay.read_prompts(cfg)
    assert len(prompts) == 60 and all(
        p[0]["role"] == "user" and not p[0]["content"].endswith("Answer:") for p in prompts
    )
    arc = [p[0]["content"] for p in prompts[:30]]
    assert all(q.startswith("Question: ") for q in arc) and len(set(arc)) == 30
    n_arc = len(load_probe("arc_easy", 10**6).items)
    for n in (50, n_arc - 30):  # the run's probe items, and the largest subset that leaves 30 over
        probed = {replay._question(it["context"]) for it in load_probe("arc_easy", n).items}
        assert len(probed) == n and not probed & set(arc)
    assert set(arc) <= {replay._question(it["context"]) for it in load_probe("arc_easy", n_arc).items}
    too_many = load_config(None, ["data.replay=[builtin:arc_easy]", "data.replay_items=30", "data.mix_ratio=0.1",
                                  "data.general=[builtin:lambada]", "eval.probes=[arc_easy]",
                                  f"eval.probe_items={n_arc - 29}"])  # fmt: skip
    with pytest.raises(UserError, match="would overlap; lower data.replay_items or eval.probe_items"):
        replay.read_prompts(too_many)


def test_a_tokenizer_without_a_chat_template_is_refused_before_generating(tiny_dir, tmp_path, home, monkeypatch):
    cfg = _cfg(tiny_dir, tmp_path)
    model, tok = _load(tiny_dir)
    tok.chat_template = None
    monkeypatch.setattr(replay, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(UserError, match=r"^data\.replay: the tokenizer of .* has no chat template"):
        _answers(cfg, model, tok)
    assert not (home / "replay").exists()


def test_replay_alone_is_general_data_enough_for_mixing():
    cfg = load_config(None, ["data.replay=[builtin:arc_easy]", "data.mix_ratio=0.1"])
    assert cfg.data.replay == ["builtin:arc_easy"] and cfg.data.general == []
    with pytest.raises(UserError, match="data.mix_ratio: mixing needs general data in data.general"):
        load_config(None, ["data.mix_ratio=0.1"])
