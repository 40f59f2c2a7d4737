import json

import pytest
import torch
from conftest import make_tokenizer, write_jsonl

from fulltune.config import DataConfig
from fulltune.data.formats import encode_dataset, encode_messages, encode_prompt_completion
from fulltune.data.loader import IGNORE, StepSampler, collate
from fulltune.data.sources import load_records
from fulltune.errors import UserError

TOK = make_tokenizer()
CONV = [
    {"role": "user", "content": "classify the movie"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "and the plot"},
    {"role": "assistant", "content": "negative"},
]


def test_assistant_mask_is_exactly_the_assistant_turns():
    ex = encode_messages(TOK, CONV, "completion")
    targets = TOK.decode([t for t, m in zip(ex.input_ids, ex.target_mask) if m])
    assert targets == "positive<|im_end|>\nnegative<|im_end|>\n"
    # The rendered prefix really is a token prefix of the full rendering.
    prefix = TOK(
        TOK.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    assert ex.input_ids[: len(prefix)] == prefix and sum(ex.target_mask[: len(prefix)]) == 0
    assert all(encode_messages(TOK, CONV, "all").target_mask)


def test_prompt_completion_mask():
    ex = encode_prompt_completion(TOK, "the movie was", " great", "completion")
    n_prompt = len(TOK("the movie was")["input_ids"])
    assert ex.target_mask == [0] * n_prompt + [1] * (len(ex.input_ids) - n_prompt)
    assert ex.input_ids[-1] == TOK.eos_token_id


def test_overlong_truncate_and_drop_are_counted(tmp_path):
    rows = [{"text": "the movie " * n} for n in (2, 40, 3)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = load_records(str(path))
    ex, stats = encode_dataset(ds, TOK, DataConfig(max_seq_len=16, overlong="truncate"), str(path))
    assert stats.truncated == 1 and len(ex) == 3 and max(len(e.input_ids) for e in ex) == 16
    ex, stats = encode_dataset(ds, TOK, DataConfig(max_seq_len=16, overlong="drop"), str(path))
    assert stats.dropped_overlong == 1 and len(ex) == 2 and stats.kept == 2


def test_truncation_that_leaves_no_target_drops_the_example(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "the movie " * 30, "completion": "good"}, {"prompt": "the", "completion": "good"}],
    )
    ex, stats = encode_dataset(load_records(str(path)), TOK, DataConfig(max_seq_len=16), str(path))
    assert len(ex) == 1 and stats.dropped_no_target == 1


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_file_types(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "the movie", "completion": "good"}] * 3)
    path = tmp_path / f"d.{suffix}"
    getattr(ds, f"to_{suffix}")(str(path))
    assert load_records(str(path))[1] == {"prompt": "the movie", "completion": "good"}


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "d"))
    assert len(load_records(str(tmp_path / "d"))) == 2


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "broken"\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        load_records(str(path))


def test_bad_record_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(UserError, match=r"m\.jsonl:2: unknown role 'robot'"):
        encode_dataset(load_records(str(path)), TOK, DataConfig(), str(path))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="no records"):
        load_records(str(tmp_path / "e.jsonl"))


def test_sampler_covers_each_epoch_once_and_resumes_without_replay():
    s = StepSampler(10, micro_batch=2, grad_accum=2, seed=3)
    assert s.steps_per_epoch == 3
    epoch0 = [i for _ in range(3) for mb in s.next_step() for i in mb]
    assert sorted(epoch0) == list(range(10))
    state = s.state_dict()
    rest = [s.next_step() for _ in range(4)]
    t = StepSampler(10, micro_batch=2, grad_accum=2, seed=3)
    t.load_state_dict(state)
    assert [t.next_step() for _ in range(4)] == rest
    assert sorted(i for step in rest[:3] for mb in step for i in mb) == list(range(10))
    with pytest.raises(UserError, match="data order changed"):
        StepSampler(11, 2, 2, 3).load_state_dict(state)


def test_collate_masks_padding_by_length_not_by_id():
    from fulltune.data.formats import Example

    eos = TOK.eos_token_id
    batch = collate([Example([5, 6, eos], [0, 1, 1]), Example([7], [1])], pad_id=eos)
    # The real EOS at the end of row 0 is a target; the padding (same id) in row 1 is not.
    assert batch["labels"].tolist() == [[IGNORE, 6, eos], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(batch["input_ids"][1], torch.tensor([7, eos, eos]))


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Windows editors and Excel's "CSV UTF-8" start a file with a BOM; it is not part of the first key."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + b'{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "d.csv").write_bytes(bom + b"prompt,completion\na,b\n")
    (tmp_path / "d.json").write_bytes(bom + b'[{"text": "a"}]')
    assert load_records(str(tmp_path / "d.jsonl"))["text"] == ["a", "b"]
    assert load_records(str(tmp_path / "d.csv"))[0] == {"prompt": "a", "completion": "b"}
    assert load_records(str(tmp_path / "d.json"))["text"] == ["a"]


def test_an_uppercase_suffix_is_read(tmp_path):
    (tmp_path / "D.JSONL").write_text('{"text": "a"}\n')
    assert load_records(str(tmp_path / "D.JSONL"))["text"] == ["a"]


def test_a_csv_record_is_named_by_the_line_it_starts_on(tmp_path):
    """Quoted cells may span lines and blank lines are skipped: record N's line is counted, not guessed."""
    from fulltune.data.sources import row_location

    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",positive\n\nx,negative\n')
    assert len(load_records(str(path))) == 2
    assert [row_location(str(path), i) for i in (0, 1)] == [f"{path}:2", f"{path}:5"]
    assert row_location(str(tmp_path / "d.parquet"), 0) == f"{tmp_path / 'd.parquet'} (record 1)"


def _encoded(tmp_path, rows, tokenizer=TOK, **cfg):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, _ = encode_dataset(load_records(str(path)), tokenizer, DataConfig(**cfg), str(path))
    return examples


def _targets(example, tokenizer=TOK) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.target_mask) if m])


def test_sharegpt_records_train_as_the_same_conversation_in_messages(tmp_path):
    """ShareGPT (conversations, from/value, human/gpt/system) is the messages conversation it names:
    the same tokens and the same loss mask, found by data.format auto."""
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    conv = [{"role": "system", "content": "be brief"}, *CONV]
    share = [{"from": names[m["role"]], "value": m["content"]} for m in conv]
    a = _encoded(tmp_path, [{"conversations": share}])[0]
    b = encode_messages(TOK, conv, "completion")
    assert a == b and _targets(a) == "positive<|im_end|>\nnegative<|im_end|>\n"


def test_alpaca_is_a_chat_turn_or_alpacas_own_prompt_without_a_template(tmp_path):
    rows = [{"instruction": "classify the movie", "input": "the plot", "output": "positive"},
            {"instruction": "classify the movie", "input": "", "output": "negative"}]  # fmt: skip
    chat = _encoded(tmp_path, rows)
    want = encode_messages(TOK, [{"role": "user", "content": "classify the movie\n\nthe plot"},
                                 {"role": "assistant", "content": "positive"}], "completion")  # fmt: skip
    assert chat[0] == want and _targets(chat[1]) == "negative<|im_end|>\n"
    plain = make_tokenizer()
    plain.chat_template = None  # a base model: Alpaca's own prompt, the loss on the response only
    ex = _encoded(tmp_path, rows, tokenizer=plain)
    text = plain.decode(ex[0].input_ids)
    assert text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\nthe plot\n\n### Response:\npositive" in text and "### Input" not in plain.decode(
        ex[1].input_ids
    )
    assert _targets(ex[0], plain) == "positive<|im_end|>" and _targets(ex[1], plain) == "negative<|im_end|>"


def test_openai_weight_zero_takes_an_assistant_turn_out_of_the_loss(tmp_path):
    """OpenAI's chat fine-tuning JSONL: weight 0 on an assistant turn, no loss there; the other turns
    (weight 1 or none) train as before, and every turn weighted 0 leaves nothing to train on."""
    weighted = [dict(CONV[0]), {**CONV[1], "weight": 0}, dict(CONV[2]), {**CONV[3], "weight": 1}]
    ex = _encoded(tmp_path, [{"messages": weighted}, {"messages": CONV}])
    assert ex[0].input_ids == ex[1].input_ids  # the weight is not shown to the template
    assert _targets(ex[0]) == "negative<|im_end|>\n" and _targets(ex[1]) == "positive<|im_end|>\nnegative<|im_end|>\n"
    none = [dict(CONV[0]), {**CONV[1], "weight": 0}]
    path = write_jsonl(tmp_path / "z.jsonl", [{"messages": none}, {"messages": CONV}])
    kept, stats = encode_dataset(load_records(str(path)), TOK, DataConfig(), str(path))
    assert len(kept) == 1 and stats.dropped_no_target == 1


def test_a_task_file_in_sharegpt_or_alpaca_scores_as_its_messages(tmp_path):
    """The task accuracy reads ShareGPT and Alpaca task files: the gold is the last answer, and each
    record's label scores equal those of the same records written as messages."""
    import contextlib

    from conftest import make_model

    from fulltune.evals.classify import gold_labels, label_accuracy

    labels, reviews = ["positive", "negative"], ["classify the movie", "and the plot", "the movie was great"]
    gold = ["positive", "negative", "negative"]
    messages = [{"messages": [{"role": "user", "content": r}, {"role": "assistant", "content": g}]}
                for r, g in zip(reviews, gold)]  # fmt: skip
    share = [
        {"conversations": [{"from": "human", "value": r}, {"from": "gpt", "value": g}]} for r, g in zip(reviews, gold)
    ]
    alpaca = [{"instruction": r, "output": g} for r, g in zip(reviews, gold)]
    model = make_model(len(TOK), layers=1, seed=3)
    results = []
    for name, rows in (("m", messages), ("s", share), ("a", alpaca)):
        path = str(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert gold_labels(load_records(path), path, labels)[1] == [0, 1, 1]
        results.append(label_accuracy(model, TOK, load_records(path), source=path, labels=labels, batch_size=4,
                                      autocast=contextlib.nullcontext))  # fmt: skip
    assert results[0]["items"] == results[1]["items"] == results[2]["items"]
