"""More bad inputs, in the harness of test_bad_input.py (docs/reliability.md lists them with the first
table): keys given twice (YAML, JSON), malformed CSV, θ0's directory checked before anything moves,
the output directory checked at once, 1-based lines and the right place blamed, implausible run
lengths, and the cases found by trying the command line by hand. Each ends in one `fulltune: error:`
line, exit 2, no traceback, and the finished run (pointed at with train.overwrite=true) untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT
from test_bad_input import (  # noqa: F401 (good_run is the shared fixture)
    _data,
    _file,
    _json_edit,
    _jsonl,
    _model,
    _problem,
    check_bad_input,
    good_run,
)

MORE: dict[str, tuple[str, object]] = {}  # name: (kind, build(ctx) -> (extra args, expected line))


def case(kind: str, name: str):
    def register(build):
        MORE[name] = (kind, build)
        return build

    return register


def _yaml(ctx, text: str) -> list[str]:
    return ["--config-in-test", str(_file(ctx, "c.yaml", text))]


def _model_case(name: str, change, expected: str):
    case("model", name)(lambda c: ([f"model.path={(m := _model(c, change))}"], expected.format(m=m)))


def _weights(edit):
    def change(path):
        from safetensors.torch import load_file, save_file

        weights = load_file(path / "model.safetensors")
        edit(weights)
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    return change


def _tokenizer(edit):
    def change(path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        edit(tok)
        tok.save_pretrained(path)

    return change


def _sharded(path):
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def _loop(ctx, name: str):
    os.symlink(ctx.tmp / name, ctx.tmp / name)
    return ctx.tmp / name


def _fifo(ctx, name: str):
    os.mkfifo(ctx.tmp / name)
    return ctx.tmp / name


ALIAS_BOMB = "eval:\n  labels:\n    - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"    - &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)  # nine levels of nine: the last label alone is 387,420,489 strings once expanded (a repr would never end)
FIRST_OF_MODEL = "{m}/model.safetensors: "

# ---- keys given twice ---------------------------------------------------------------------------
case("config", "a YAML section given twice")(
    lambda c: (
        _yaml(c, "optim:\n  lr: 3.0e-4\ntrain:\n  epochs: 1\noptim:\n  weight_decay: 0.1\n"),
        f"{c.tmp / 'c.yaml'}:5: duplicate key 'optim' (first on line 1); YAML would keep only the last one and "
        "silently drop the first: merge the two",
    )
)
case("config", "a key given twice inside a YAML section")(
    lambda c: (
        _yaml(c, "optim:\n  lr: 3.0e-4\n  lr: 1.0e-3\n"),
        f"{c.tmp / 'c.yaml'}:3: duplicate key 'optim.lr' (first on line 2); YAML would keep only the last one and "
        "silently drop the first: merge the two",
    )
)
case("config", "a key given twice in an override's value")(
    lambda c: (
        ["eval.forgetting_budget={piqa: 1, piqa: 2}"],
        "override 'eval.forgetting_budget={piqa: 1, piqa: 2}': duplicate key 'piqa'; YAML would keep only the "
        "last one and silently drop the first: merge the two",
    )
)
case("data", "a JSONL record with a key given twice")(
    lambda c: (
        _data(_file(c, "k.jsonl", '{"text": "a"}\n{"text": "b", "text": "c"}\n')),
        f"{c.tmp / 'k.jsonl'}:2: duplicate key 'text' in a JSON object (a reader keeps only its last value); "
        "remove one",
    )
)
case("data", "a message with its role given twice")(
    lambda c: (
        _data(_file(c, "r.jsonl", '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}\n')),
        f"{c.tmp / 'r.jsonl'}:1: duplicate key 'role' in a JSON object (a reader keeps only its last value); "
        "remove one",
    )
)
case("data", "a .json record with a key given twice, on line 2")(
    lambda c: (
        _data(_file(c, "k.json", '[{"text": "a"},\n {"text": "b",\n  "text": "c"}]\n')),
        f"{c.tmp / 'k.json'}:2: duplicate key 'text' in a JSON object (a reader keeps only its last value); remove one",
    )
)

# ---- malformed CSV ------------------------------------------------------------------------------
CSV_HEAD = "prompt,completion\nreview one,positive\n"
case("data", "a CSV quote that is never closed")(
    lambda c: (
        _data(_file(c, "q.csv", CSV_HEAD + '"review two,negative\nreview three,positive\n')),
        f"{c.tmp / 'q.csv'}:3: a quote opened in this record is never closed, so every row after it would be read "
        'as one cell; close it, or double a quote inside a quoted cell ("")',
    )
)
case("data", "a CSV quote closed only rows later (rows would merge)")(
    lambda c: (
        _data(_file(c, "m.csv", CSV_HEAD + '"review two,negative\nreview three,positive\n"review four",positive\n')),
        f"{c.tmp / 'm.csv'}:3: a quote opened in this record closes only on line 5, where text follows it (',' "
        "expected after '\"'): an unmatched quote swallows the rows between; close it where the cell ends",
    )
)
case("data", "a CSV cell with a stray quote after a closing one")(
    lambda c: (
        _data(_file(c, "s.csv", 'prompt,completion\n"a "b" c",positive\n')),
        f"{c.tmp / 's.csv'}:2: text after a closing quote (',' expected after '\"'); inside a quoted cell write "
        'a quote as "", or quote the whole cell',
    )
)
case("data", "a CSV header that names a column twice")(
    lambda c: (
        _data(_file(c, "h.csv", "prompt,prompt,completion\na,b,c\n")),
        f"{c.tmp / 'h.csv'}:1: column 'prompt' appears twice in the header; a reader keeps only one",
    )
)
case("data", "a CSV with only its header")(
    lambda c: (_data(_file(c, "o.csv", "prompt,completion\n")), f"{c.tmp / 'o.csv'}: no records (only the header line)")
)
case("data", "a CSV record with a missing answer, named by its line")(
    lambda c: (
        _data(_file(c, "n.csv", 'prompt,completion\n"two\nlines",positive\n\n"x",\n'), "data.format=text"),
        f"{c.tmp / 'n.csv'}: format text needs column(s) text; found prompt, completion",
    )
)

# ---- θ0's directory, checked before anything is moved or written ---------------------------------
_model_case(
    "a shard the index names is missing",
    _sharded,
    "{m}/model.safetensors.index.json: names shards that are not in the directory: "
    "model-00002-of-00002.safetensors (an incomplete download?)",
)
_model_case(
    "config.json's vocab_size is not the weights' (a shape mismatch)",
    _json_edit(lambda cfg: cfg.update(vocab_size=500)),
    FIRST_OF_MODEL + "tensor 'model.embed_tokens.weight' has shape [385, 32], but config.json implies [500, 32] "
    "(vocab_size 500, hidden_size 32, num_hidden_layers 3, num_attention_heads 4, num_key_value_heads 2, "
    "intermediate_size 64, head_dim 8, max_position_embeddings 256); the weights and config.json come from different "
    "models",
)
_model_case(
    "a head_dim the weights do not have",
    _json_edit(lambda cfg: cfg.update(head_dim=16)),
    FIRST_OF_MODEL + "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [16, 32], but config.json implies "
    "[32, 32] (vocab_size 385, hidden_size 32, num_hidden_layers 3, num_attention_heads 4, num_key_value_heads 2, "
    "intermediate_size 64, head_dim 16, max_position_embeddings 256); the weights and config.json come from "
    "different models",
)
_model_case(
    "an integer weight",
    _weights(lambda w: w.update({"model.norm.weight": w["model.norm.weight"].to(torch.int32)})),
    FIRST_OF_MODEL + "weight 'model.norm.weight' is I32, not floating point: it would load as wrong numbers (a "
    "quantised or damaged export?); use the model's float weights",
)
_model_case(
    "a bool weight",
    _weights(lambda w: w.update({"model.layers.0.mlp.up_proj.weight": w["model.layers.0.mlp.up_proj.weight"] > 0})),
    FIRST_OF_MODEL + "weight 'model.layers.0.mlp.up_proj.weight' is BOOL, not floating point: it would load as wrong "
    "numbers (a quantised or damaged export?); use the model's float weights",
)
_model_case(
    "a tokenizer with more ids than the embedding has rows",
    _tokenizer(lambda tok: tok.add_tokens([f"newtoken{i}" for i in range(20)])),
    "{m}/tokenizer.json: the tokenizer has 405 tokens (ids up to 404), but the model's embedding has 385 rows "
    "(config.json vocab_size): an id ≥ 385 fails at the first step; use the tokenizer the model was trained with",
)
_model_case(
    "a pad_token_id outside the vocabulary",
    _json_edit(lambda cfg: cfg.update(pad_token_id=5000)),
    "{m}/config.json: pad_token_id 5000 is not a token id of this model (0 to 384)",
)
_model_case(
    "a generation_config.json eos id outside the vocabulary",
    lambda p: (p / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 999]})),
    "{m}/generation_config.json: eos_token_id 999 is not a token id of this model (0 to 384)",
)
_model_case(
    "a tokenizer without an eos token",
    lambda p: (p / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((p / "tokenizer_config.json").read_text()).items() if "eos" not in k})
    ),
    "{m}/tokenizer_config.json: the tokenizer has no eos_token; each training sequence ends with it (and pads with "
    "it when there is no pad_token): set it to the token that ends the model's turns",
)
_model_case(
    "heads that do not divide hidden_size",
    _json_edit(lambda cfg: [cfg.update(num_attention_heads=5, num_key_value_heads=5), cfg.pop("head_dim")]),
    "{m}/config.json: hidden_size 32 is not divisible by num_attention_heads 5 (and no head_dim is given), so the "
    "attention heads cannot split it",
)
_model_case(
    "key/value heads that do not divide the heads",
    _json_edit(lambda cfg: cfg.update(num_key_value_heads=3)),
    "{m}/config.json: num_attention_heads 4 is not divisible by num_key_value_heads 3 (grouped-query attention "
    "shares each key/value head among a whole number of heads)",
)
_model_case(
    "a size of 0 in config.json",
    _json_edit(lambda cfg: cfg.update(vocab_size=0)),
    "{m}/config.json: vocab_size must be a positive integer, got 0",
)
_model_case(
    "a size written as a string in config.json",
    _json_edit(lambda cfg: cfg.update(num_hidden_layers="3")),
    "{m}/config.json: num_hidden_layers must be a positive integer, got '3'",
)
_model_case(
    "a config.json that is a list",
    lambda p: (p / "config.json").write_text("[1, 2]"),
    "{m}/config.json: expected a JSON object ({{...}}), got list",
)
_model_case(
    "a tokenizer_config.json that does not parse",
    lambda p: (p / "tokenizer_config.json").write_text('{"bos_token": '),
    "{m}/tokenizer_config.json: not valid JSON (Expecting value: line 1 column 15 (char 14))",
)
_model_case(
    "a tokenizer_config.json that is a list",
    lambda p: (p / "tokenizer_config.json").write_text("[]"),
    "{m}/tokenizer_config.json: expected a JSON object ({{...}}), got list",
)
_model_case(
    "a truncated tokenizer.json",
    lambda p: (p / "tokenizer.json").write_bytes((p / "tokenizer.json").read_bytes()[:500]),
    "{m}/tokenizer.json: not valid JSON (Unterminated string starting at: line 26 column 18 (char 490))",
)
_model_case(
    "a generation_config.json that does not parse",
    lambda p: (p / "generation_config.json").write_text("{oops"),
    "{m}/generation_config.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
    "(char 1))",
)
_model_case(
    "a model.safetensors.index.json that does not parse",
    lambda p: (p / "model.safetensors.index.json").write_text("{"),
    "{m}/model.safetensors.index.json: not valid JSON (Expecting property name enclosed in double quotes: line 1 "
    "column 2 (char 1))",
)
_model_case(
    "a chat template with a Jinja syntax error",
    lambda p: (p / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }"),
    "{m}/chat_template.jinja: the chat template is not valid Jinja (template line 1: unexpected '}}'); fix it, or "
    "copy the template of the model this one was trained from",
)
case("model", "a chat template that fails on every conversation")(
    lambda c: (
        [f"model.path={(m := _model(c, lambda p: (p / 'chat_template.jinja').write_text(BROKEN)))}"],
        f"{c.chat}:1: the chat template ({m}/chat_template.jinja) fails on this conversation (UndefinedError: "
        "'dict object' has no attribute 'nope')",
    )
)
BROKEN = "{% for message in messages %}{{ message['content'] + message.nope.deeper }}{% endfor %}"
case("model", "model.path is a file that is not GGUF")(
    lambda c: (
        [f"model.path={(m := _model(c, lambda p: None)) / 'config.json'}"],
        f"model.path: {m / 'config.json'} is a file; name the model's directory (config.json, *.safetensors "
        "and the tokenizer files) or a .gguf file",
    )
)
case("model", "model.path is a run directory")(
    lambda c: (
        [f"model.path={c.run}"],
        f"{c.run}: not an HF model directory (no config.json); it is a fulltune run directory: its model is "
        f"{c.run / 'final'}",
    )
)
case("model", "model.path is a symlink loop")(
    lambda c: (
        [f"model.path={_loop(c, 'm')}"],
        f"model.path {c.tmp / 'm'}: symlink loop (following its links never reaches a file); point it at the real file",
    )
)

# ---- the output directory, checked before θ0 is even looked at -----------------------------------
case("output", "train.output_dir below a file")(
    lambda c: (
        [f"train.output_dir={_file(c, 'afile', 'x') / 'run'}"],
        f"train.output_dir: {c.tmp / 'afile' / 'run'} cannot be made: {c.tmp / 'afile'} is a file, not a directory",
    )
)
case("output", "train.output_dir below a file, with a broken model too (the directory is said first)")(
    lambda c: (
        [f"train.output_dir={_file(c, 'afile', 'x') / 'run'}", f"model.path={c.tmp / 'gone'}"],
        f"train.output_dir: {c.tmp / 'afile' / 'run'} cannot be made: {c.tmp / 'afile'} is a file, not a directory",
    )
)
case("output", "train.output_dir a FIFO")(
    lambda c: (
        [f"train.output_dir={_fifo(c, 'o')}"],
        f"train.output_dir: {c.tmp / 'o'}: is a FIFO (named pipe), not a regular file",
    )
)
case("output", "train.output_dir a symlink loop")(
    lambda c: (
        [f"train.output_dir={_loop(c, 'o')}"],
        f"train.output_dir: {c.tmp / 'o'}: symlink loop (following its links never reaches a file); point it at "
        "the real file",
    )
)
case("checkpoint", "train.resume a file")(
    lambda c: (
        [f"train.resume={c.chat}"],
        f"train.resume: {c.chat} is a file; name a checkpoint directory (RUN/checkpoints/step-N) or auto",
    )
)

# ---- files that are not regular files, and where a line number must be right ----------------------
case("data", "a data file that is a FIFO")(
    lambda c: (_data(_fifo(c, "f.jsonl")), f"data file {c.tmp / 'f.jsonl'}: is a FIFO (named pipe), not a regular file")
)
case("data", "a data file that is a symlink loop")(
    lambda c: (
        _data(_loop(c, "l.jsonl")),
        f"data file {c.tmp / 'l.jsonl'}: symlink loop (following its links never reaches a file); point it at the "
        "real file",
    )
)
case("data", "a data file that is a dangling symlink")(
    lambda c: (
        _data((os.symlink(c.tmp / "gone.jsonl", c.tmp / "d.jsonl"), c.tmp / "d.jsonl")[1]),
        f"data file {c.tmp / 'd.jsonl'}: a dangling symlink (to {c.tmp / 'gone.jsonl'}, which does not exist)",
    )
)
case("data", "a data file that is /dev/null")(
    lambda c: (_data("/dev/null"), "data file /dev/null: is a character device, not a regular file")
)
case("data", "a .json file with a syntax error on line 3")(
    lambda c: (
        _data(_file(c, "s.json", '[\n {"text": "a"},\n {"text": }\n]\n')),
        f"{c.tmp / 's.json'}:3: malformed JSON (Expecting value at column 11)",
    )
)
case("data", "a .json file of JSON lines with a bad third line")(
    lambda c: (
        _data(_file(c, "l.json", '{"text": "a"}\n{"text": "b"}\n{"text": }\n')),
        f"{c.tmp / 'l.json'}:3: malformed JSON (Expecting value at column 10)",
    )
)
case("data", "a raw NUL inside a JSON string")(
    lambda c: (
        _data(_file(c, "z.jsonl", b'{"text": "a\x00b"}\n')),
        f"{c.tmp / 'z.jsonl'}:1: malformed JSON line (a raw control character '\\x00' inside a string at column 12; "
        "escape it)",
    )
)
case("data", "a parquet record 2 without text (1-based)")(
    lambda c: (
        _data(_parquet(c)),
        f"{c.tmp / 'p.parquet'} (record 2): text must be a string, got null (a missing value)",
    )
)
case("data", "a malformed line in a file under a unicode path")(
    lambda c: (
        _data(_file(c, "données 日本.jsonl", '{"text": "a"}\n{bad\n')),
        f"{c.tmp / 'données 日本.jsonl'}:2: malformed JSON line (Expecting property name enclosed in double quotes at "
        "column 2)",
    )
)
case("data", "data.train a symlink to a plain directory")(
    lambda c: (
        _data((os.symlink(c.tmp, c.tmp / "link"), c.tmp / "link")[1]),
        f"{c.tmp / 'link'}: a directory must be a datasets save_to_disk directory",
    )
)
case("data", "an eval.task_file that is a FIFO")(
    lambda c: (
        [f"eval.task_file={_fifo(c, 't.jsonl')}", "eval.labels=[positive, negative]"],
        f"data file {c.tmp / 't.jsonl'}: is a FIFO (named pipe), not a regular file",
    )
)
case("data", "an unknown probe name")(
    lambda c: (
        ["eval.probes=[arc_eazy]"],
        "unknown probe 'arc_eazy' (built-in: arc_easy, piqa, sciq, humaneval, mbpp; or mc:FILE.jsonl / "
        "text:FILE.jsonl / lmeval:TASK)",
    )
)

# ---- the config file and the command line: each problem blamed where it was made ----------------
case("config", "data.train empty")(
    lambda c: (
        ["data.train="],
        _problem(
            "data.train: empty; name the training data (a file, a save_to_disk directory or builtin:sst2/train) "
            "(set on the command line)"
        ),
    )
)
case("config", "model.path empty")(
    lambda c: (
        ["model.path="],
        _problem(
            "model.path: empty; name θ0 (an HF model directory, a .gguf file, or default) (set on the command line)"
        ),
    )
)
case("config", "a config file that is a FIFO")(
    lambda c: (
        ["--config-in-test", str(_fifo(c, "c.yaml"))],
        f"config file {c.tmp / 'c.yaml'}: is a FIFO (named pipe), not a regular file",
    )
)
case("config", "a config file that is a symlink loop")(
    lambda c: (
        ["--config-in-test", str(_loop(c, "c.yaml"))],
        f"config file {c.tmp / 'c.yaml'}: symlink loop (following its links never reaches a file); point it at the "
        "real file",
    )
)
case("config", "a config path that is a directory")(
    lambda c: (["--config-in-test", str(c.tmp)], f"config file {c.tmp}: is a directory; name the YAML file")
)
case("config", "a config file that is not UTF-8, on line 2")(
    lambda c: (
        ["--config-in-test", str(_file(c, "u.yaml", b"optim:\n  lr: 1.0e-4 # \xff\n"))],
        f"{c.tmp / 'u.yaml'}:2: not UTF-8 (byte 0xff); save the file as UTF-8",
    )
)
case("config", "a misspelled section on the command line (not blamed on the YAML)")(
    lambda c: (
        ["optimm.lr=1"],
        _problem(
            "optimm: unknown key (valid: model, data, optim, schedule, train, anchor, loss, eval) "
            "(set on the command line)"
        ),
    )
)
case("config", "an override key with an empty part")(
    lambda c: (["optim..lr=1"], "override 'optim..lr=1': expected key=value, e.g. optim.lr=3e-5")
)
case("config", "a YAML section that is a list, met by an override")(
    lambda c: (
        _yaml(c, "data: [a, b]\n"),
        _problem("data: expected a section (mapping), got ['a', 'b']; the override data.train sets a key inside it"),
    )
)
case("config", "eval.labels yes/no (YAML booleans)")(
    lambda c: (
        [f"eval.task_file={c.chat}", "eval.labels=[yes, no]"],
        _problem(
            "eval.labels: expected a list of strings, got [True, False] (YAML reads yes/no/on/off/true/false as "
            "booleans: quote them) (set on the command line)"
        ),
    )
)
case("config", "a label given twice")(
    lambda c: (
        [f"eval.task_file={c.chat}", "eval.labels=[positive, positive]"],
        _problem("eval.labels: 'positive' is given twice (set on the command line)"),
    )
)
case("config", "a YAML alias bomb in eval.labels")(
    lambda c: (
        _yaml(c, ALIAS_BOMB),
        _problem(
            "eval.labels: expected a list of strings, got [['x', 'x', 'x', 'x', 'x', 'x', ...], "
            + ", ".join(["[[...], [...], [...], [...], [...], [...], ...]"] * 5)
            + ", ...]"
        ),
    )
)
case("config", "an empty value for a number")(
    lambda c: (["optim.lr="], _problem("optim.lr: expected float, got str '' (set on the command line)"))
)
case("config", "an unknown loss.type")(
    lambda c: (["loss.type=foo"], _problem("loss.type: 'foo' is not one of ce, dft (set on the command line)"))
)
case("config", "a negative loss.kl_to_theta0")(
    lambda c: (
        ["loss.kl_to_theta0=-1"],
        _problem("loss.kl_to_theta0: -1.0 must be >= 0.0 (set on the command line)"),
    )
)
case("config", "an optim.rank above a matrix's shorter side")(
    lambda c: (
        ["optim.name=apollo", "optim.rank=64"],
        "optim.rank: 64 is larger than the shorter side of model.layers.0.self_attn.k_proj.weight (16 × 32); "
        "use at most 16",
    )
)
case("config", "optim.project_embeddings with an optimiser that does not project")(
    lambda c: (
        ["optim.project_embeddings=true"],
        _problem(
            "optim.project_embeddings: only galore, apollo and apollo_mini project gradients, not adamw "
            "(set on the command line)"
        ),
    )
)
case("config", "a loss.kl_reference outside its choices")(
    lambda c: (
        ["loss.kl_reference=disk"],
        _problem("loss.kl_reference: 'disk' is not one of live, cached (set on the command line)"),
    )
)
case("config", "an eval.budget_rule outside its choices")(
    lambda c: (
        ["eval.budget_rule=loose"],
        _problem("eval.budget_rule: 'loose' is not one of significant, strict, point (set on the command line)"),
    )
)


# ---- data.replay (self-distilled replay, data/replay.py) ---------------------------------------
def _replay(ctx, *more: str) -> list[str]:
    general = _jsonl(ctx, "g.jsonl", [{"text": "the movie was great fun"}] * 4)
    return [f"data.general=[{general}]", "data.mix_ratio=0.5", *more]


def _no_chat_template(path):
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)


case("data", "an unknown data.replay built-in")(
    lambda c: (
        _replay(c, "data.replay=[builtin:nope]"),
        "data.replay: unknown built-in 'builtin:nope' (built-in: builtin:arc_easy, builtin:piqa, builtin:sciq; "
        "or a JSONL file of prompts)",
    )
)
case("data", "a data.replay prompt file that is missing")(
    lambda c: (
        _replay(c, f"data.replay=[{c.tmp / 'p.jsonl'}]"),
        f"data.replay: prompt file not found: {c.tmp / 'p.jsonl'}",
    )
)
ENDS_WITH_ANSWER = [
    {"prompt": "hi"},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
]
case("data", "a data.replay prompt that ends with the answer, on line 2")(
    lambda c: (
        _replay(c, f"data.replay=[{_jsonl(c, 'p.jsonl', ENDS_WITH_ANSWER)}]"),
        f'data.replay: {c.tmp / "p.jsonl"}:2: expected a string "prompt" or a "messages" list of role/content '
        "ending with a user turn",
    )
)
case("data", "data.replay with data.mix_ratio 0")(
    lambda c: (
        ["data.replay=[builtin:arc_easy]", "data.mix_ratio=0"],
        "data.replay: θ0's answers are mixed into training by data.mix_ratio, which is 0 (nothing would be "
        "mixed); set data.mix_ratio > 0 (e.g. 0.1)",
    )
)
case("config", "data.replay_items 0")(
    lambda c: (["data.replay_items=0"], _problem("data.replay_items: 0 must be >= 1 (set on the command line)"))
)
case("model", "data.replay for a tokenizer without a chat template")(
    lambda c: (
        [
            f"model.path={(m := _model(c, _no_chat_template))}",
            *_data(_jsonl(c, "t.jsonl", [{"text": "the movie was great fun"}] * 8)),
            *_replay(c, f"data.replay=[{_jsonl(c, 'p.jsonl', [{'prompt': 'what is the capital of france'}])}]"),
        ],
        f"data.replay: the tokenizer of {m} has no chat template; θ0 answers replay prompts in its chat format, "
        "so use a chat model or drop data.replay",
    )
)

# ---- implausible run lengths ---------------------------------------------------------------------
case("config", "train.epochs 1e9 (a 12-billion-step run)")(
    lambda c: (
        ["train.max_steps=0", "train.epochs=1e9"],
        _problem(
            "train.epochs: 1e+09 epochs is at least 1,000,000,000 optimiser steps (one or more each), more than "
            "10,000,000; if you mean it, set train.allow_long_run=true (set on the command line)"
        ),
    )
)
case("config", "train.max_steps above ten million")(
    lambda c: (
        ["train.max_steps=20000000"],
        _problem(
            "train.max_steps: 20,000,000 optimiser steps is more than 10,000,000; if you mean it, set "
            "train.allow_long_run=true (set on the command line)"
        ),
    )
)
case("config", "epochs that make more than ten million steps of this data")(
    lambda c: (
        ["train.max_steps=0", "train.epochs=2e6"],
        "train.epochs: 2e+06 epochs of 24 records at 4×1 sequences a step is about 12,000,000 optimiser steps, more "
        "than 10,000,000; if you mean it, set train.allow_long_run=true",
    )
)


def _parquet(ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(["a", None, "c"])}), ctx.tmp / "p.parquet")
    return ctx.tmp / "p.parquet"


def test_the_docs_list_these_cases_too():
    assert len(MORE) >= 60
    assert {kind for kind, _ in MORE.values()} == {"data", "config", "model", "checkpoint", "output"}
    doc = (ROOT / "docs" / "reliability.md").read_text()
    missing = [name for name in MORE if f"| {name} |" not in doc]
    assert not missing, f"docs/reliability.md's bad-input table lacks: {missing}"


@pytest.mark.parametrize("name", MORE)
def test_another_bad_input_is_one_line_and_damages_nothing(capfd, good_run, tmp_path, name):  # noqa: F811
    check_bad_input(capfd, good_run, tmp_path, MORE[name][1])
