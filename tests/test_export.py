"""`fulltune export --gguf`: llama.cpp's own converter writes one GGUF with the tokenizer and the chat
template that the gguf reader reads back, and an Ollama Modelfile beside it; a model the converter
cannot take, or a missing package, is one line and leaves no file."""

from __future__ import annotations

import pytest
from conftest import tiny_overrides

from fulltune.cli import main


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """The embedded default (SmolLM2-135M-Instruct) exported at q8_0, once for the module."""
    out = tmp_path_factory.mktemp("gguf") / "smol-q8_0.gguf"
    assert main(["export", "default", "--gguf", "--type", "q8_0", "--out", str(out)]) == 0
    return out


def _reader(path, monkeypatch):
    from fulltune.commands.export import converter_dir

    monkeypatch.syspath_prepend(str(converter_dir() / "gguf-py"))  # the writer's own reader, same version
    import gguf

    return gguf, gguf.GGUFReader(str(path))


def test_the_gguf_holds_the_weights_tokenizer_and_chat_template(q8, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from fulltune.model import resolve_model_path

    gguf, reader = _reader(q8, monkeypatch)
    source = resolve_model_path("default")
    tokenizer, config = AutoTokenizer.from_pretrained(source), AutoConfig.from_pretrained(source)

    def field(name):
        f = reader.fields[name]
        return f.contents()

    assert field("general.architecture") == "llama" and field("llama.block_count") == config.num_hidden_layers
    assert len(field("tokenizer.ggml.tokens")) == len(tokenizer)
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0  # the matrices at q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # the norms kept in f32
    assert len(reader.tensors) == 2 + 9 * config.num_hidden_layers  # embedding, final norm, 9 a block (tied head)
    modelfile = q8.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{q8.name}\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_a_model_the_converter_cannot_take_is_one_line_and_no_file(capsys, tiny_dir, chat_file, tmp_path, monkeypatch):
    """The tiny test model's tokenizer is a BPE llama.cpp does not know: the converter refuses it."""
    from fulltune.config import load_config
    from fulltune.train import run_training

    run = tmp_path / "run"
    run_training(
        load_config(None, tiny_overrides(tiny_dir, chat_file, run, **{"train.max_steps": 1}) + ["eval.task_file="])
    )
    capsys.readouterr()
    assert main(["export", str(run), "--gguf"]) == 2  # a run directory: its final/
    err = capsys.readouterr().err
    assert err.count("fulltune: error:") == 1 and f"llama.cpp's converter failed on {run / 'final'}" in err
    assert not list(run.glob("*.gguf")) and not list(run.glob(".*.tmp"))  # beside final/, nothing half-written
    assert (run / "run-f16.log").is_file()  # the converter's own log, kept
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a)
    )
    assert main(["export", str(run), "--gguf"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("fulltune: error: --gguf needs sentencepiece for llama.cpp's converter: pip install 'fulltune[gguf]'")
    )


# family: (config class, model class, extra config, llama.cpp's architecture name). Llama is the q8_0 test
# above (SmolLM2); Mistral converts as llama too (bench/gguf_llamacpp.py --families, with llama.cpp running each
# family's file): kept out for CI's time.
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, "qwen3"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}, "gemma3"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "olmo2"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_llama_cpp_converts_exports(family, tmp_path, monkeypatch):
    """A tiny random-init model of each family the converter takes with a BPE tokenizer (SmolLM2's,
    standing in: llama.cpp recognises a tokenizer by its output), exported and read back. Qwen2,
    Gemma-2 and Phi-3 need their own tokenizer files (docs/usage.md), which this offline test lacks."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from fulltune.model import resolve_model_path

    config_cls, model_cls, extra, arch = FAMILIES[family]
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=49152, max_position_embeddings=256, **shape, **extra)
    model_dir = tmp_path / family
    getattr(transformers, model_cls)(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_model_path("default")).save_pretrained(model_dir)
    out = tmp_path / f"{family}.gguf"
    assert main(["export", str(model_dir), "--gguf", "--out", str(out)]) == 0
    gguf, reader = _reader(out, monkeypatch)
    assert reader.fields["general.architecture"].contents() == arch
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert reader.fields[f"{arch}.block_count"].contents() == 2


def test_a_gemma3_that_llama_cpp_would_compute_differently_is_warned_of():
    """llama.cpp reads no query_pre_attn_scalar: Gemma-3 converts, but only the released configs (the
    scalar equal to head_dim, or hidden/heads for the 62-layer 27B) compute the same model there."""
    from fulltune.commands.export import llama_cpp_mismatch

    gemma = {"model_type": "gemma3_text", "head_dim": 16, "hidden_size": 64, "num_attention_heads": 4}
    assert llama_cpp_mismatch({**gemma, "query_pre_attn_scalar": 16, "num_hidden_layers": 2}) is None
    line = llama_cpp_mismatch({**gemma, "query_pre_attn_scalar": 256, "num_hidden_layers": 2})
    assert line.startswith("query_pre_attn_scalar is 256, but llama.cpp scales Gemma-3's queries as if it were 16 ")
    big = {"model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376, "num_attention_heads": 32}
    assert llama_cpp_mismatch({**big, "query_pre_attn_scalar": 168, "num_hidden_layers": 62}) is None  # 27B
    assert llama_cpp_mismatch({"model_type": "gemma3", "text_config": {"num_hidden_layers": 34}}) is None  # 4B
    assert llama_cpp_mismatch({"model_type": "llama", "query_pre_attn_scalar": 3}) is None
