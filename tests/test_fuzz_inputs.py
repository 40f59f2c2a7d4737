"""Property-based fuzzing (hypothesis) of the data readers and the chat formatter: whatever a file
or a record holds, they either give well-formed examples or raise UserError (one line for the CLI),
never anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fulltune.config import DataConfig
from fulltune.data.formats import encode_dataset, encode_record
from fulltune.data.sources import load_records
from fulltune.errors import UserError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = st.sampled_from(["text", "prompt", "completion", "messages", "role", "content", "x"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "Assistant"]) | SCALARS
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name"]), ROLES | JSON, max_size=3) | JSON
CONVERSATION = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}),
    max_size=5,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of hundreds of fuzzed files out of the user's ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _read_and_encode(suffix: str, content: bytes, tokenizer) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(content)
        try:
            ds = load_records(str(path))
            examples, stats = encode_dataset(ds, tokenizer, DataConfig(max_seq_len=32), str(path))
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc).strip(), str(exc)
            return
    for ex in examples:  # what was accepted is well formed
        assert len(ex.input_ids) == len(ex.target_mask) <= 32 and set(ex.target_mask) <= {0, 1}
        assert sum(ex.target_mask[1:]) > 0 and all(isinstance(t, int) for t in ex.input_ids)
    assert stats.kept == len(examples) > 0


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_as_jsonl(tokenizer, data):
    _read_and_encode(".jsonl", data, tokenizer)


@FUZZ
@given(st.lists(st.dictionaries(KEYS, JSON, max_size=4) | JSON, min_size=1, max_size=5))
def test_any_json_values_as_jsonl(tokenizer, rows):
    _read_and_encode(".jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), tokenizer)


@FUZZ
@given(
    st.lists(st.lists(st.text(alphabet=st.sampled_from('ab ,"\n\r\x00é1'), max_size=8), max_size=4), max_size=5),
    st.sampled_from(["prompt,completion\n", "text\n", "messages\n", "", "a,b,c\n"]),
)
def test_any_csv(tokenizer, rows, header):
    body = "".join(",".join(cells) + "\n" for cells in rows)
    _read_and_encode(".csv", (header + body).encode(), tokenizer)


@FUZZ
@given(st.lists(MESSAGE, max_size=4) | JSON)
def test_the_chat_formatter_on_any_messages(tokenizer, messages):
    try:
        ex = encode_record(tokenizer, {"messages": messages}, "messages", loss_on="completion", where="f.jsonl:1")
    except UserError as exc:
        assert str(exc).startswith("f.jsonl:1: "), str(exc)
        return
    assert len(ex.input_ids) == len(ex.target_mask) and set(ex.target_mask) <= {0, 1}


@FUZZ
@given(CONVERSATION, st.sampled_from(["completion", "all"]))
def test_the_assistant_mask_is_exactly_the_assistant_text(tokenizer, messages, loss_on):
    """For well-formed conversations the targets decode to the assistant turns, each with its end marker."""
    try:
        ex = encode_record(tokenizer, {"messages": messages}, "messages", loss_on=loss_on, where="f.jsonl:1")
    except UserError as exc:
        assert str(exc).startswith("f.jsonl:1: "), str(exc)
        return
    if loss_on == "all":
        assert set(ex.target_mask) <= {1}
        return
    targets = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.target_mask) if m])
    assert targets == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
