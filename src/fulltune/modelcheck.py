"""θ0's directory checked before anything is moved or written and before the (slow) load: each fault
that would otherwise end in a traceback, in zeros loaded and trained, or in an IndexError at the first
step (after an overwrite had already moved the finished run aside) is one line naming the file.

- config.json: valid JSON, an object, a known model_type, sizes that are positive integers, heads that
  divide the hidden size (when head_dim is not given) and key/value heads that divide the heads;
- the weights: safetensors only, every shard model.safetensors.index.json names is present, each
  header readable, each tensor's shape what config.json implies (the model built on the meta device,
  no weight read) and each weight floating point;
- the tokenizer: its files present and parsing, its ids (len(tokenizer) and its special ids, and the
  token ids config.json and generation_config.json name) inside the embedding's rows, its chat template
  valid Jinja.

`default` is checked where it is already prepared; a .gguf file is left to gguf's own checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fulltune.errors import UserError, input_path

JSON_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "generation_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
)
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}
_CHECKED: set = set()  # directories already checked in this process, with their files' sizes and times


def check_model_path(spec: str, trust_remote_code: bool, name: str = "model.path") -> None:
    """model.path as a config or a command names it (`name` says which, in the messages): 'default',
    a .gguf file, or an HF directory."""
    if spec == "default":
        from fulltune.assets import home

        path = home() / "models" / "SmolLM2-135M-Instruct"
        if not (path / "model.safetensors").is_file():
            return  # prepared (and so checked by construction) at load
    else:
        path = Path(spec).expanduser()
    input_path(path, name)
    if path.is_file():
        if path.suffix == ".gguf":
            return
        raise UserError(
            f"{name}: {path} is a file; name the model's directory (config.json, *.safetensors and the "
            "tokenizer files) or a .gguf file"
        )
    check_model_dir(path, trust_remote_code)


def check_model_dir(path: Path, trust_remote_code: bool) -> None:
    """Every check above on an HF model directory; raises UserError naming the file at the first fault."""
    key = (str(path.resolve()), trust_remote_code, _stamp(path))
    if key in _CHECKED:
        return
    if not (path / "config.json").is_file():
        run = (path / "final" / "config.json").is_file() and (path / "config.yaml").is_file()
        raise UserError(
            f"{path}: not an HF model directory (no config.json)"
            + (f"; it is a fulltune run directory: its model is {path / 'final'}" if run else "")
        )
    _refuse_pickles_only(path)
    config = read_json(path / "config.json")
    _check_architecture(path, config, trust_remote_code)
    _check_sizes(path / "config.json", config)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); copy them from "
            "the base model's directory"
        )
    for name in JSON_FILES:
        if (path / name).is_file():
            read_json(path / name)
    tensors = _headers(path)
    model = _meta_model(path, trust_remote_code)
    if "quantization_config" not in config:
        _check_tensors(path, config, tensors, model)
    _check_vocabulary(path, model, trust_remote_code)
    _CHECKED.add(key)


def _stamp(path: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))


def read_json(file: Path):
    """A JSON file's value; not UTF-8, malformed or a repeated key: one line naming the file."""

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            raise UserError(f"{file}: the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(pairs)

    try:
        value = json.loads(file.read_bytes().decode("utf-8"), object_pairs_hook=unique)
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except ValueError as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None
    if file.name != "vocab.json" and file.name.endswith(".json") and not isinstance(value, dict):
        raise UserError(f"{file}: expected a JSON object ({{...}}), got {type(value).__name__}")
    return value


def _refuse_pickles_only(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    raise UserError(
        f"{path}: no *.safetensors weights (fulltune loads safetensors only, never pickles"
        + (f"; {', '.join(pickles[:3])} would be one: convert it to safetensors with code you trust" if pickles else "")
        + ")"
    )


def _check_architecture(path: Path, config, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING, __version__

    if not isinstance(config, dict) or not config.get("model_type"):
        raise UserError(
            f"{path / 'config.json'}: no model_type (is this a transformers model directory? its "
            'config.json names the architecture, e.g. "model_type": "llama")'
        )
    kind = config["model_type"]
    if not isinstance(kind, str):
        raise UserError(f"{path / 'config.json'}: model_type must be a string, got {kind!r}")
    if kind not in CONFIG_MAPPING and not trust_remote_code:
        code = (config.get("auto_map") or {}).get("AutoModelForCausalLM") if isinstance(config, dict) else None
        raise UserError(
            f"{path / 'config.json'}: model_type {kind!r} is not an architecture transformers {__version__} knows"
            + (
                f"; its auto_map names the directory's own code ({code}), which runs only with "
                "model.trust_remote_code=true (no code was run)"
                if code
                else ""
            )
        )


def _check_sizes(file: Path, config: dict) -> None:
    """Sizes are positive integers; heads divide the width; key/value heads divide the heads."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in SIZES:
            value = cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{file}: {key} must be a positive integer, got {value!r}")
        hidden, heads, kv = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        if hidden and heads and cfg.get("head_dim") is None and hidden % heads:
            raise UserError(
                f"{file}: hidden_size {hidden} is not divisible by num_attention_heads {heads} (and no head_dim "
                "is given), so the attention heads cannot split it"
            )
        if heads and kv and heads % kv:
            raise UserError(
                f"{file}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv} (grouped-query "
                "attention shares each key/value head among a whole number of heads)"
            )
        if isinstance(cfg.get("vocab_size"), int):
            _check_token_ids(file, cfg, cfg["vocab_size"])


def _headers(path: Path) -> dict[str, tuple[list[int], str, Path]]:
    """{tensor name: (shape, dtype, file)} from every safetensors header (no weight read); every shard
    that model.safetensors.index.json names must be there."""
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map (tensor name → shard file)")
        missing = sorted({str(s) for s in weight_map.values() if not (path / str(s)).is_file()})
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserError(f"{index}: names shards that are not in the directory: {shown} (an incomplete download?)")
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open is not iterable)
                    info = f.get_slice(name)
                    tensors[name] = (list(info.get_shape()), info.get_dtype(), file)
        except (SafetensorError, OSError) as exc:
            raise UserError(
                f"{file}: not a valid safetensors file ({exc}); it may be truncated or still downloading"
            ) from None
    return tensors


def _meta_model(path: Path, trust_remote_code: bool):
    """The architecture config.json describes, built on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code, attn_implementation="eager"
            )
    except UserError:
        raise
    except Exception as exc:  # transformers' own checks of the config, in many types
        what = " ".join(str(exc).split())[:300]
        raise UserError(f"{path / 'config.json'}: transformers cannot build the model it describes ({what})") from None


def _check_tensors(path: Path, config: dict, tensors: dict, model) -> None:
    """Each tensor's shape is what config.json implies; each weight is floating point."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    weights = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "") + "."
    sizes = ", ".join(f"{k} {config[k]}" for k in SIZES if isinstance(config.get(k), int))
    for name, (shape, dtype, file) in tensors.items():
        known = name if name in expected else prefix + name  # a base model's weights, saved without its head
        if known in expected and shape != expected[known]:
            raise UserError(
                f"{file}: tensor {name!r} has shape {shape}, but config.json implies {expected[known]} ({sizes}); "
                "the weights and config.json come from different models"
            )
        if known in weights and dtype not in FLOATS:
            raise UserError(
                f"{file}: weight {name!r} is {dtype}, not floating point: it would load as wrong numbers (a "
                "quantised or damaged export?); use the model's float weights"
            )


def _check_vocabulary(path: Path, model, trust_remote_code: bool) -> None:
    """Every id the tokenizer can produce, and every token id the configs name, has an embedding row."""
    rows = model.get_input_embeddings().weight.shape[0]
    tokenizer = _tokenizer(path, trust_remote_code)
    file = _tokenizer_file(path)
    if len(tokenizer) > rows:
        raise UserError(
            f"{file}: the tokenizer has {len(tokenizer)} tokens (ids up to {len(tokenizer) - 1}), but the model's "
            f"embedding has {rows} rows (config.json vocab_size): an id ≥ {rows} fails at the first step; use the "
            "tokenizer the model was trained with"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(
            f"{path / 'tokenizer_config.json'}: the tokenizer has no eos_token; each training sequence ends with it "
            "(and pads with it when there is no pad_token): set it to the token that ends the model's turns"
        )
    for token, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        if token_id is not None and not 0 <= token_id < rows:
            raise UserError(f"{file}: special token {token!r} has id {token_id}, outside the embedding's {rows} rows")
    if (path / "generation_config.json").is_file():
        _check_token_ids(path / "generation_config.json", read_json(path / "generation_config.json"), rows)
    _check_template(tokenizer)


def _check_token_ids(file: Path, config: dict, rows: int) -> None:
    """The special token ids a config names (bos, eos, pad) are rows of the embedding."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        ids = config.get(key)
        for token_id in ids if isinstance(ids, list) else [ids]:
            if token_id is not None and (
                isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < rows
            ):
                raise UserError(f"{file}: {key} {token_id!r} is not a token id of this model (0 to {rows - 1})")


def _tokenizer_file(path: Path) -> Path:
    return next((path / n for n in TOKENIZER_FILES if (path / n).is_file()), path / "tokenizer_config.json")


def _tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the tokenizers library and transformers fail in many types
        what = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(
            f"{_tokenizer_file(path)}: the tokenizer does not load ({type(exc).__name__}: {what}); copy the "
            "tokenizer files from the base model's directory"
        ) from None


def _check_template(tokenizer) -> None:
    """The chat template compiles (a syntax error is the template's fault, not any data record's)."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from fulltune.data.formats import template_syntax_error

    templates = tokenizer.chat_template
    for template in templates.values() if isinstance(templates, dict) else [templates]:
        if not isinstance(template, str):
            continue
        try:
            _compile_jinja_template(template)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(template_syntax_error(tokenizer, exc)) from None
