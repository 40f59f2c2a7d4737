"""Bad inputs a user can bring, as one table (docs/reliability.md lists the same cases): each ends in
one `fulltune: error:` line naming the file (and line) or the key, exit 2, no traceback, and the
finished run in train.output_dir (pointed at with train.overwrite=true) left byte-for-byte untouched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICKSTART, ROOT, sentiment_records, tiny_overrides, write_jsonl

from fulltune.cli import main

CASES: dict[str, tuple[str, object]] = {}  # name: (what kind of input, build(ctx) -> (extra args, expected line))


def case(kind: str, name: str):
    def register(build):
        CASES[name] = (kind, build)
        return build

    return register


def _file(ctx, name: str, text: str | bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _jsonl(ctx, name: str, rows: list) -> Path:
    return _file(ctx, name, "".join(json.dumps(r) + "\n" for r in rows))


def _data(path: Path, *more: str) -> list[str]:
    return [f"data.train={path}", *more]


TEXT = [{"text": "the movie was great fun"}] * 4
# ---- data files -------------------------------------------------------------------------------
case("data", "data file missing")(
    lambda c: (_data(c.tmp / "nope.jsonl"), f"data file not found: {c.tmp / 'nope.jsonl'}")
)
case("data", "empty file")(
    lambda c: (_data(_file(c, "e.jsonl", "")), f"{c.tmp / 'e.jsonl'}: no records (the file is empty)")
)
case("data", "only blank lines")(
    lambda c: (_data(_file(c, "b.jsonl", "\n \n\n")), f"{c.tmp / 'b.jsonl'}: no records (the file is empty)")
)
case("data", "unsupported file type")(
    lambda c: (
        _data(_file(c, "d.txt", "hi")),
        f"{c.tmp / 'd.txt'}: unsupported file type '.txt' (use .jsonl, .json, .csv, .parquet, .arrow)",
    )
)
case("data", "malformed JSON on line 3")(
    lambda c: (
        _data(_file(c, "m.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')),
        f"{c.tmp / 'm.jsonl'}:3: malformed JSON line (Expecting value at column 10)",
    )
)
case("data", "a JSON line that is not an object")(
    lambda c: (
        _data(_file(c, "a.jsonl", '{"text": "a"}\n[1, 2]\n')),
        f"{c.tmp / 'a.jsonl'}:2: expected a JSON object per line, got list",
    )
)
case("data", "bytes that are not UTF-8")(
    lambda c: (
        _data(_file(c, "u.jsonl", b'{"text": "ok"}\n{"text": "ok too"}\n{"text": "bad \xff\xfe here"}\n')),
        f"{c.tmp / 'u.jsonl'}:3: not UTF-8 (byte 0xff at column 15); save the file as UTF-8",
    )
)
case("data", "a number where text belongs, on line 6")(
    lambda c: (
        _data(_jsonl(c, "n.jsonl", TEXT + [{"text": "x"}, {"text": 12345}, {"text": "x"}])),
        f"{c.tmp / 'n.jsonl'}:6: text must be a string, got int",
    )
)
case("data", "a list where text belongs, after a schema change")(
    lambda c: (
        _data(_jsonl(c, "s.jsonl", TEXT + [{"text": ["a"]}])),
        f"{c.tmp / 's.jsonl'}:5: text must be a string, got list",
    )
)
case("data", "columns of no known format")(
    lambda c: (
        _data(_jsonl(c, "c.jsonl", [{"foo": "x"}] * 3)),
        f"{c.tmp / 'c.jsonl'}: cannot tell the format from columns foo (expected messages, conversations (ShareGPT), "
        "prompt+completion, instruction+output (Alpaca), or text)",
    )
)
case("data", "data.format that the columns do not hold")(
    lambda c: (
        _data(_jsonl(c, "f.jsonl", [{"prompt": "a", "completion": "b"}] * 3), "data.format=messages"),
        f"{c.tmp / 'f.jsonl'}: format messages needs column(s) messages; found prompt, completion",
    )
)
case("data", "messages that are not a list")(
    lambda c: (
        _data(_jsonl(c, "ml.jsonl", [{"messages": "hi"}] * 3)),
        f"{c.tmp / 'ml.jsonl'}:1: messages must be a non-empty list",
    )
)
case("data", "an empty conversation on line 2")(
    lambda c: (
        _data(_jsonl(c, "me.jsonl", sentiment_records(1) + [{"messages": []}])),
        f"{c.tmp / 'me.jsonl'}:2: messages must be a non-empty list",
    )
)
case("data", "a message without content")(
    lambda c: (
        _data(_jsonl(c, "mc.jsonl", [{"messages": [{"role": "user"}]}] * 3)),
        f"{c.tmp / 'mc.jsonl'}:1: each message needs string 'role' and 'content', got {{'role': 'user'}}",
    )
)
case("data", "an unknown role")(
    lambda c: (
        _data(_jsonl(c, "ur.jsonl", [{"messages": [{"role": "tool", "content": "x"}]}] * 3)),
        f"{c.tmp / 'ur.jsonl'}:1: unknown role 'tool' (system, user, assistant)",
    )
)
case("data", "a ShareGPT turn with an unknown role")(
    lambda c: (
        _data(_jsonl(c, "sg.jsonl", [{"conversations": [{"from": "tool", "value": "x"}]}] * 3)),
        f"{c.tmp / 'sg.jsonl'}:1: ShareGPT role 'tool' is not one of human, gpt, system",
    )
)
case("data", "an Alpaca output that is not a string")(
    lambda c: (
        _data(_jsonl(c, "al.jsonl", [{"instruction": "rate it", "output": 3}] * 3)),
        f"{c.tmp / 'al.jsonl'}:1: Alpaca's output must be a string, got int",
    )
)
case("data", "a weight on a user turn")(
    lambda c: (
        _data(
            _jsonl(
                c,
                "w.jsonl",
                [{"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}]
                * 3,
            )
        ),  # fmt: skip
        f"{c.tmp / 'w.jsonl'}:1: weight 0 on a user turn; weight is 0 or 1, on assistant turns",
    )
)
case("data", "a prompt that is not a string")(
    lambda c: (
        _data(_jsonl(c, "p.jsonl", [{"prompt": 3, "completion": "b"}] * 3)),
        f"{c.tmp / 'p.jsonl'}:1: prompt and completion must be strings",
    )
)
case("data", "every record too long, data.overlong=drop")(
    lambda c: (
        _data(_jsonl(c, "o.jsonl", [{"text": "the movie " * 100}] * 3), "data.overlong=drop"),
        f"{c.tmp / 'o.jsonl'}: no usable sequences (0/3 sequences kept, 0 tokens (0 with loss), longest 0; "
        "truncated 0, dropped 3 overlong, 0 with no target tokens)",
    )
)
case("data", "a directory that is not a saved dataset")(
    lambda c: (_data(c.tmp), f"{c.tmp}: a directory must be a datasets save_to_disk directory")
)
case("data", "a CSV row with extra fields")(
    lambda c: (
        _data(_file(c, "r.csv", "prompt,completion\na,b\nc,d,e,f\n")),
        f"{c.tmp / 'r.csv'}:3: 4 fields, but the header has 2; a cell holding a comma must be in double quotes",
    )
)
case("data", "a parquet file that is not parquet")(
    lambda c: (
        _data(_file(c, "g.parquet", "not parquet")),
        f"{c.tmp / 'g.parquet'}: could not read records: ArrowInvalid: Parquet "
        "magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.",
    )
)
case("data", "chat data for a tokenizer without a chat template")(
    lambda c: (
        ["model.path=" + str(_no_template(c))],
        f"{c.chat}:1: the tokenizer has no chat template; use text or prompt+completion data",
    )
)
case("data", "an eval.task_file with a malformed line")(
    lambda c: (
        [f"eval.task_file={_file(c, 't.jsonl', '{bad')}"],
        f"{c.tmp / 't.jsonl'}:1: malformed JSON line (Expecting property name enclosed in double quotes at column 2)",
    )
)
case("data", "a general-data file that is missing")(
    lambda c: (
        [f"data.general=[{c.tmp / 'g.jsonl'}]", "data.mix_ratio=0.5"],
        f"data file not found: {c.tmp / 'g.jsonl'}",
    )
)


def _no_template(ctx) -> Path:
    model = ctx.tmp / "model"
    shutil.copytree(ctx.tiny, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    return model


# ---- config -----------------------------------------------------------------------------------
def _problem(line: str) -> str:
    return "  " + line


case("config", "an unknown key")(
    lambda c: (
        ["optim.lrr=1"],
        _problem(
            "optim.lrr: unknown key (valid: name, lr, weight_decay, betas, eps, momentum, rank, update_proj_gap, "
            "project_embeddings, proj_scale, grad_clip, cpu_offload, decay_toward, layer_lr_decay) (set on the "
            "command line)"
        ),
    )
)
case("config", "a tracker fulltune does not know")(
    lambda c: (
        ["train.loggers=[comet]"],
        _problem("train.loggers: 'comet' is not one of tensorboard, mlflow, wandb (set on the command line)"),
    )
)
case("config", "an unknown section in the YAML")(
    lambda c: (
        ["--config-in-test", str(_file(c, "s.yaml", "optimizer:\n  lr: 1\n"))],
        _problem("optimizer: unknown key (valid: model, data, optim, schedule, train, anchor, loss, eval)"),
    )
)
case("config", "a value not among the choices")(
    lambda c: (
        ["train.precision=fp64"],
        _problem("train.precision: 'fp64' is not one of auto, fp32, bf16-mixed, bf16 (set on the command line)"),
    )
)
case("config", "a string where a number belongs")(
    lambda c: (['optim.lr="abc"'], _problem("optim.lr: expected float, got str 'abc' (set on the command line)"))
)
case("config", "a string where a number belongs, in the YAML")(
    lambda c: (
        ["--config-in-test", str(_file(c, "n.yaml", "optim:\n  weight_decay: abc\n"))],
        _problem("optim.weight_decay: expected float, got str 'abc'"),
    )
)
case("config", "a negative learning rate")(
    lambda c: (["optim.lr=-1"], _problem("optim.lr: -1.0 must be > 0.0 (set on the command line)"))
)
case("config", "a sequence length below the minimum")(
    lambda c: (["data.max_seq_len=0"], _problem("data.max_seq_len: 0 must be >= 8 (set on the command line)"))
)
case("config", "a micro-batch of 0")(
    lambda c: (
        ["train.micro_batch_size=0"],
        _problem("train.micro_batch_size: 0 must be >= 1 (set on the command line)"),
    )
)
case("config", "an optimiser fulltune does not have")(
    lambda c: (
        ["optim.name=lion"],
        _problem(
            "optim.name: 'lion' is not one of adamw, sgd, adafactor, adamw8bit, adamw4bit, muon, adam_mini, "
            "galore, apollo, apollo_mini (set on the command line)"
        ),
    )
)
case("config", "a validation fraction above the limit")(
    lambda c: (["data.val_fraction=1.5"], _problem("data.val_fraction: 1.5 must be <= 0.5 (set on the command line)"))
)
case("config", "a word where a bool belongs")(
    lambda c: (
        ["train.overwrite=maybe"],
        _problem("train.overwrite: expected bool, got str 'maybe' (set on the command line)"),
    )
)
case("config", "a forgetting budget for a probe the run does not have")(
    lambda c: (
        ["eval.probes=[piqa]", f"eval.task_file={c.chat}", "eval.forgetting_budget={arc_easy: 2}"],
        _problem(
            "eval.forgetting_budget.arc_easy: not a probe of this run (eval.probes: piqa) (set on the command line)"
        ),
    )
)
case("config", "an override without =")(
    lambda c: (["optim.lr"], "fulltune: error: override 'optim.lr': expected key=value, e.g. optim.lr=3e-5")
)
case("config", "an override that is not YAML")(
    lambda c: (
        ["optim.lr=[1"],
        "fulltune: error: override 'optim.lr=[1': the value is not valid YAML (quote it, e.g. optim.lr='[1')",
    )
)
case("config", "a YAML syntax error on line 3")(
    lambda c: (
        ["--config-in-test", str(_file(c, "y.yaml", "optim:\n  lr: 1\n bad: [\n"))],
        f"fulltune: error: {c.tmp / 'y.yaml'}:3:2: not valid YAML (expected <block end>, "
        "but found '<block mapping start>', while parsing a block mapping)",
    )
)
case("config", "a YAML file that is a list")(
    lambda c: (
        ["--config-in-test", str(_file(c, "l.yaml", "- a\n- b\n"))],
        f"fulltune: error: {c.tmp / 'l.yaml'}: the top level must be a mapping of sections",
    )
)
case("config", "a config file that is missing")(
    lambda c: (
        ["--config-in-test", str(c.tmp / "none.yaml")],
        f"fulltune: error: config file not found: {c.tmp / 'none.yaml'}",
    )
)


# ---- model directory --------------------------------------------------------------------------
def _model(ctx, change) -> Path:
    path = ctx.tmp / "model"
    shutil.copytree(ctx.tiny, path)
    change(path)
    return path


def _model_case(name: str, change, expected: str):
    case("model", name)(
        lambda c: (
            [f"model.path={(m := _model(c, change))}"],
            "fulltune: error: " + expected.format(m=m, v=__import__("transformers").__version__),
        )
    )


def _truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _json_edit(edit):
    def change(path):
        cfg = json.loads((path / "config.json").read_text())
        edit(cfg)
        (path / "config.json").write_text(json.dumps(cfg))

    return change


def _pickle_only(path):
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def _drop_a_tensor(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


case("model", "model.path missing")(
    lambda c: ([f"model.path={c.tmp / 'm'}"], f"fulltune: error: model.path not found: {c.tmp / 'm'}")
)
case("model", "a .gguf file that is not GGUF")(
    lambda c: (
        [f"model.path={_file(c, 'x.gguf', 'not gguf at all')}"],
        f"fulltune: error: {c.tmp / 'x.gguf'} does not start with the GGUF magic bytes, so it is not a GGUF file.",
    )
)
_model_case(
    "a directory without config.json",
    lambda p: (p / "config.json").unlink(),
    "{m}: not an HF model directory (no config.json)",
)
_model_case(
    "model.safetensors truncated",
    _truncate,
    "{m}/model.safetensors: not a valid safetensors file (Error while "
    "deserializing header: incomplete metadata, file not fully covered); it may be truncated or still downloading",
)
_model_case(
    "model.safetensors garbage",
    lambda p: (p / "model.safetensors").write_bytes(b"\x07" * 5000),
    "{m}/model.safetensors: not a valid safetensors file (Error while deserializing header: header too large); "
    "it may be truncated or still downloading",
)
_model_case(
    "pickled weights only (pytorch_model.bin)",
    _pickle_only,
    "{m}: no *.safetensors weights (fulltune loads "
    "safetensors only, never pickles; pytorch_model.bin would be one: convert it to safetensors with code you trust)",
)
_model_case(
    "a weight missing from the safetensors",
    _drop_a_tensor,
    "{m}: the checkpoint does not match the architecture, "
    "some weights would be randomly initialised or dropped (missing keys: model.norm.weight)",
)
_model_case(
    "config.json malformed",
    lambda p: (p / "config.json").write_text("{not json"),
    "{m}/config.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
)
_model_case(
    "config.json without model_type",
    _json_edit(lambda cfg: cfg.pop("model_type")),
    "{m}/config.json: no model_type (is this a transformers model directory? its config.json names the "
    'architecture, e.g. "model_type": "llama")',
)
_model_case(
    "an unknown model_type with auto_map, remote code off",
    _json_edit(
        lambda cfg: cfg.update(
            model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}
        )
    ),
    "{m}/config.json: model_type 'mystery' is not an architecture transformers {v} knows; its auto_map names the "
    "directory's own code (modeling_mystery.MysteryForCausalLM), which runs only with model.trust_remote_code=true "
    "(no code was run)",
)
_model_case(
    "no tokenizer files",
    lambda p: [f.unlink() for f in p.glob("tokenizer*")],
    "{m}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
    "copy them from the base model's directory",
)


# ---- checkpoints ------------------------------------------------------------------------------
def _checkpoint_copy(ctx, change) -> Path:
    path = ctx.tmp / "ckpt"
    shutil.copytree(sorted((ctx.run / "checkpoints").iterdir())[-1], path)
    change(path)
    return path


case("checkpoint", "train.resume that does not exist")(
    lambda c: (
        [f"train.resume={c.tmp / 'gone'}"],
        f"fulltune: error: train.resume: {c.tmp / 'gone'} does not exist (auto resumes "
        "the latest checkpoint in train.output_dir)",
    )
)
case("checkpoint", "train.resume that is not a checkpoint")(
    lambda c: (
        [f"train.resume={c.tmp}"],
        f"fulltune: error: train.resume: {c.tmp} is not a fulltune checkpoint (no trainer_state.json)",
    )
)
case("checkpoint", "a checkpoint without config.yaml")(
    lambda c: (
        [f"train.resume={(p := _checkpoint_copy(c, lambda p: (p / 'config.yaml').unlink()))}"],
        f"fulltune: error: train.resume: {p} is damaged "
        "(files differ from the manifest (missing ['config.yaml'], unexpected []))",
    )
)
case("checkpoint", "a checkpoint with a damaged optimizer state")(
    lambda c: (
        [f"train.resume={(p := _checkpoint_copy(c, lambda p: (p / 'optimizer.pt').write_bytes(b'x')))}"],
        f"fulltune: error: train.resume: {p} is damaged (optimizer.pt: 1 bytes, the manifest says "
        f"{(c.run / 'checkpoints' / 'step-0000002' / 'optimizer.pt').stat().st_size})",
    )
)
case("checkpoint", "resume with a changed learning rate")(
    lambda c: (
        ["train.resume=auto", "train.overwrite=false", "optim.lr=0.5"],
        f"fulltune: error: cannot resume from {c.run}/checkpoints/step-0000002: "
        "the config changed in ways that alter the run "
        "(optim.lr: 0.001 → 0.5); start a new run (another train.output_dir) instead",
    )
)
case("checkpoint", "resume with a longer run")(
    lambda c: (
        ["train.resume=auto", "train.overwrite=false", "train.max_steps=4"],
        f"fulltune: error: cannot resume from {c.run}/checkpoints/step-0000002: the run had 2 steps and now has 4 "
        "(train.max_steps / train.epochs), which re-stretches the lr schedule after step 2; set "
        "train.allow_schedule_change=true to continue on the new curve",
    )
)


# ---- output directory -------------------------------------------------------------------------
case("output", "a finished run without train.overwrite")(
    lambda c: (
        ["train.overwrite=false"],
        f"fulltune: error: {c.run} already holds a run; resume it with train.resume=auto, pick "
        "another train.output_dir, or set train.overwrite=true",
    )
)
case("output", "train.output_dir that is a file")(
    lambda c: (
        [f"train.output_dir={_file(c, 'afile', 'x')}"],
        f"fulltune: error: train.output_dir: {c.tmp / 'afile'} is a file, not a directory",
    )
)
case("output", "an empty train.output_dir")(
    lambda c: (
        ["train.output_dir="],
        _problem(
            "train.output_dir: empty; name the run's directory (an empty one would be the current directory) "
            "(set on the command line)"
        ),
    )
)
case("output", "a directory of someone else's files, with overwrite")(
    lambda c: (
        [f"train.output_dir={_foreign(c)}"],
        f"fulltune: error: train.output_dir: {c.tmp / 'mine'} holds files that no fulltune "
        "run wrote (final); a run only clears its own directory: pick a new or empty train.output_dir",
    )
)


def _foreign(ctx) -> Path:
    (ctx.tmp / "mine" / "final").mkdir(parents=True)
    (ctx.tmp / "mine" / "final" / "NOTES.txt").write_text("keep me")
    return ctx.tmp / "mine"


@pytest.fixture(scope="module")
def good_run(tiny_dir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2: every bad input is pointed at it."""
    tmp = tmp_path_factory.mktemp("good")
    chat = write_jsonl(tmp / "chat.jsonl", sentiment_records(24))
    base = tiny_overrides(tiny_dir, chat, tmp / "run", **{"train.max_steps": 2, "train.save_interval": 1}) + [
        "eval.task_file=",
        "data.val_fraction=0",
    ]
    assert main(["train", QUICKSTART, *base]) == 0
    return SimpleNamespace(run=tmp / "run", chat=chat, base=base, tiny=tiny_dir)


def _snapshot(*dirs: Path) -> dict:
    """Every regular file's bytes (a FIFO or a symlink loop among the inputs is not read)."""
    return {
        p: p.read_bytes()
        for d in dirs
        if d.exists()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_damages_nothing(capfd, good_run, tmp_path, name):
    check_bad_input(capfd, good_run, tmp_path, CASES[name][1])


def check_bad_input(capfd, good_run, tmp_path, build) -> None:
    """The harness of every table row (here and in test_bad_input_more.py): `fulltune train` on the row's
    input against the finished run, with train.overwrite=true; exit 2, exactly the row's one line, no
    traceback, and every file of the run and of the row's inputs byte for byte as before."""
    ctx = SimpleNamespace(**vars(good_run), tmp=tmp_path)
    args, expected = build(ctx)
    config = QUICKSTART
    if args[:1] == ["--config-in-test"]:  # the case is the YAML file itself
        config, args = args[1], args[2:]
    before = _snapshot(good_run.run, tmp_path)
    capfd.readouterr()
    assert main(["train", config, *good_run.base, "train.overwrite=true", *args]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("fulltune: error: ") == 1
    lines = err[err.index("fulltune: error: ") :].strip().splitlines()
    assert lines[-1] == (
        expected if expected.startswith(("fulltune: error: ", "  ")) else "fulltune: error: " + expected
    )
    assert len(lines) == 1 or (
        re.fullmatch(r"fulltune: error: invalid config( in \S+)? \(1 problem\):", lines[0]) and len(lines) == 2
    )
    assert _snapshot(good_run.run, tmp_path) == before  # the run and the inputs themselves: untouched


def test_the_table_has_forty_cases_and_the_docs_list_each():
    assert len(CASES) >= 40
    assert {kind for kind, _ in CASES.values()} == {"data", "config", "model", "checkpoint", "output"}
    doc = (ROOT / "docs" / "reliability.md").read_text()
    missing = [name for name in CASES if f"| {name} |" not in doc]
    assert not missing, f"docs/reliability.md's bad-input table lacks: {missing}"


def test_records_that_train_but_look_like_mistakes_are_warned_about(capsys, tiny_dir, tmp_path):
    rows = sentiment_records(8)
    rows[2]["messages"][-1]["content"] = "  "
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion\n" + "".join(f"review {i},positive\n" for i in range(6)) + "a review\n")
    for source, where in ((data, f"{data}:3"), (csv, f"{csv}:8")):
        assert (
            main(
                [
                    "train",
                    QUICKSTART,
                    *tiny_overrides(
                        tiny_dir,
                        source,
                        tmp_path / source.suffix[1:],
                        **{"train.max_steps": 1, "schedule.warmup_steps": 50},
                    ),
                    "eval.task_file=",
                    "data.val_fraction=0",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert f"[data] warning: 1 record with an empty answer ({where}): they train the model to answer nothing" in out
        assert "[train] warning: schedule.warmup_steps 50 is longer than the run (1 steps)" in out
