"""Bad inputs a user can bring: one `fulltune: error:` line naming the file (and line) or the key,
exit 2, no traceback, and an existing run in train.output_dir left untouched (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl
from fulltune.cli import main


def _model_dir(tiny_dir, tmp_path, change):
    path = tmp_path / "model"
    shutil.copytree(tiny_dir, path)
    change(path)
    return path


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _unknown_architecture(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg))


MODEL_CASES = {  # name: (change to a copy of the tiny model directory, expected line after "fulltune: error: ")
    "truncated safetensors": (_truncate, "{m}/model.safetensors: not a valid safetensors file (Error while deserializing "
                                         "header: incomplete metadata, file not fully covered); it may be truncated or still downloading"),
    "garbage safetensors": (lambda p: (p / "model.safetensors").write_bytes(b"\x07" * 5000),
                            "{m}/model.safetensors: not a valid safetensors file (Error while deserializing header: "
                            "header too large); it may be truncated or still downloading"),
    "malformed config.json": (lambda p: (p / "config.json").write_text("{not json"),
                              "{m}/config.json: not valid JSON (Expecting property name enclosed in double quotes: "
                              "line 1 column 2 (char 1))"),
    "no tokenizer files": (lambda p: [f.unlink() for f in p.glob("tokenizer*")],
                           "{m}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); copy them from the "
                           "base model's directory"),
    "unknown architecture with auto_map": (_unknown_architecture, "{m}/config.json: model_type 'mystery' is not an "
                                           "architecture transformers {v} knows; its auto_map names the directory's own "
                                           "code (modeling_mystery.MysteryForCausalLM), which runs only with "
                                           "model.trust_remote_code=true (no code was run)"),
}


@pytest.fixture
def good_run(tiny_dir, chat_file, tmp_path):
    """A finished run whose directory every bad input below is pointed at (with overwrite)."""
    out = tmp_path / "run"
    assert main(["train", QUICKSTART, *tiny_overrides(tiny_dir, chat_file, out, **{"train.max_steps": 1}),
                 "eval.task_file=", "data.val_fraction=0"]) == 0
    return out, {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _refused(capsys, good_run, args) -> str:
    out, before = good_run
    capsys.readouterr()
    assert main(["train", QUICKSTART, *args, f"train.output_dir={out}", "train.overwrite=true",
                 "eval.task_file=", "data.val_fraction=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_broken_model_directory_is_one_line(capsys, good_run, tiny_dir, chat_file, tmp_path, case):
    import transformers
    change, expected = MODEL_CASES[case]
    model = _model_dir(tiny_dir, tmp_path, change)
    line = _refused(capsys, good_run, tiny_overrides(model, chat_file, tmp_path / "unused"))
    assert line == "fulltune: error: " + expected.format(m=model, v=transformers.__version__)


def test_a_file_that_is_not_gguf(capsys, good_run, chat_file, tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_text("not gguf at all")
    line = _refused(capsys, good_run, tiny_overrides(fake, chat_file, tmp_path / "unused"))
    assert line == f"fulltune: error: {fake} does not start with the GGUF magic bytes, so it is not a GGUF file."


def test_a_bad_value_is_blamed_on_where_it_came_from(capsys, good_run, tiny_dir, chat_file, tmp_path):
    args = tiny_overrides(tiny_dir, chat_file, tmp_path / "unused") + ['optim.lr="abc"']
    capsys.readouterr()
    out, before = good_run
    assert main(["train", QUICKSTART, *args, f"train.output_dir={out}", "train.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["fulltune: error: invalid config (1 problem):",
                                        "  optim.lr: expected float, got str 'abc' (set on the command line)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: abc\n")
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fulltune: error: invalid config in {bad} (1 problem):",
                                                            "  optim.lr: expected float, got str 'abc'"]


def test_bytes_that_are_not_utf8_are_reported_by_line(capsys, good_run, tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "ok"}\n{"text": "ok too"}\n{"text": "bad \xff\xfe here"}\n')
    line = _refused(capsys, good_run, tiny_overrides(tiny_dir, data, tmp_path / "unused"))
    assert line == f"fulltune: error: {data}:3: not UTF-8 (byte 0xff at column 15); save the file as UTF-8"


def test_a_number_where_text_belongs_is_reported_on_its_line(capsys, good_run, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}] * 5 + [{"text": 12345}, {"text": "x"}])
    line = _refused(capsys, good_run, tiny_overrides(tiny_dir, data, tmp_path / "unused"))
    assert line == f"fulltune: error: {data}:6: text must be a string, got int"


def test_records_that_train_but_look_like_mistakes_are_warned_about(capsys, tiny_dir, tmp_path):
    rows = sentiment_records(8)
    rows[2]["messages"][-1]["content"] = "  "
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n" + "".join(f"review {i},positive\n" for i in range(6)) + "a review\n")
    for source, where in ((data, f"{data}:3"), (csv, f"{csv} (CSV record 7)")):
        assert main(["train", QUICKSTART, *tiny_overrides(tiny_dir, source, tmp_path / source.suffix[1:], **{
            "train.max_steps": 1, "schedule.warmup_steps": 50}), "eval.task_file=", "data.val_fraction=0"]) == 0
        out = capsys.readouterr().out
        assert f"[data] warning: 1 record with an empty answer ({where}): they train the model to answer nothing" in out
        assert "[train] warning: schedule.warmup_steps 50 is longer than the run (1 steps)" in out
