"""The models users bring, as tiny random-init configs: Llama-3, Qwen2, Qwen3, Mistral, Gemma-2,
Gemma-3, Phi-3, OLMo-2. Each trains 2 steps and exports; the export reloads with identical logits;
the target-only LM head equals the model's own logits at the target positions (soft-capping
included); the per-layer rates find the decoder layers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import QUICKSTART, make_tokenizer, sentiment_records, tiny_overrides, write_jsonl
from fulltune.cli import main
from fulltune.data.formats import encode_record
from fulltune.data.loader import collate
from fulltune.loss import _plain_head, target_logprobs
from fulltune.model import decoder_layers

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, eos_token_id=2, pad_token_id=2, bos_token_id=1)
FAMILIES = {  # name: (config class, extra settings)
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                                "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import transformers
    tok = make_tokenizer()
    out = {}
    for name, (cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, cls)(vocab_size=len(tok), **COMMON, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config).float()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_the_target_only_head_equals_the_models_own_logits(family_dirs, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(family_dirs[name])
    examples = [encode_record(tok, r, "messages", "completion", "x") for r in sentiment_records(3)]
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logp, rows = target_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    select = labels != -100
    expected = torch.log_softmax(logits[:, :-1][select], -1).gather(-1, labels[select][:, None])[:, 0]
    assert torch.allclose(logp, expected, atol=1e-5), (name, (logp - expected).abs().max())
    if name.startswith("gemma"):
        assert not _plain_head(model)  # soft-capping / scaling: the model's own logits are used
    assert len(decoder_layers(model)) == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_two_steps_export_and_reload_with_identical_logits(family_dirs, name, tmp_path):
    from transformers import AutoModelForCausalLM
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    out = tmp_path / "run"
    assert main(["train", QUICKSTART, *tiny_overrides(family_dirs[name], data, out, **{
        "train.max_steps": 2, "optim.layer_lr_decay": 1.5}), "eval.task_file=", "data.val_fraction=0"]) == 0
    groups = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert len(groups) > 2  # the per-layer rates found the decoder layers
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    from safetensors.torch import load_file
    ckpt = load_file(str(out / "checkpoints" / "step-0000002" / "model.safetensors"))
    trained = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32).eval()
    trained.load_state_dict(ckpt, strict=False)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
