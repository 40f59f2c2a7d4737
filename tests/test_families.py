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
from fulltune.loss import plain_head, target_logprobs
from fulltune.model import decoder_layers

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=2,
    pad_token_id=2,
    bos_token_id=1,
)
# Each family's chat template, written for these tests after the family's own (no tools): what matters
# to the mask is kept (role names, turn markers, where EOS goes, how a system message is handled,
# which earlier turns are re-rendered). Markers are added to the test tokenizer as special tokens.
TEMPLATES = {  # name: (template, its special tokens)
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        [],
    ),
    # Qwen3: a turn after the last user message carries a <think> block (empty if none); earlier turns lose theirs.
    "qwen3": (
        "{%- set ns = namespace(last=messages|length - 1, searching=true) %}{%- for m in messages[::-1] %}"
        "{%- if ns.searching and m['role'] == 'user' %}{%- set ns.searching = false %}"
        "{%- set ns.last = messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}"
        "{%- for m in messages %}{%- set content = m['content'] %}"
        "{%- if m['role'] == 'assistant' %}{%- set reasoning = '' %}{%- if '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
        "{%- if loop.index0 > ns.last and (loop.last or reasoning) %}"
        "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{%- endif %}"
        "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
        ["<think>", "</think>"],
    ),
    # Mistral v0.3: the system message goes with the last user turn only.
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
        "{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}",
        ["[INST]", "[/INST]"],
    ),
    "gemma2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
    # Gemma-3: the system text opens the first user turn.
    "gemma3": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim "
        "+ '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
    # Phi-3: EOS closes a conversation rendered without the generation prompt.
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    # OLMo-2 (Tulu): EOS ends each assistant turn, a newline after it unless it is the last.
    "olmo2": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + m['content'] + eos_token + ('' if loop.last else '\n') }}"
        "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}",
        ["<|system|>", "<|user|>", "<|assistant|>"],
    ),
}
FAMILIES = {  # name: (config class, extra settings)
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 8,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 8,
            "sliding_window": 16,
        },
    ),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
}


def family_tokenizer(name: str):
    template, markers = TEMPLATES[name]
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": markers}) if markers else None
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import transformers

    out = {}
    for name, (cls, extra) in FAMILIES.items():
        tok = family_tokenizer(name)
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
    examples = [encode_record(tok, r, "messages", loss_on="completion", where="x") for r in sentiment_records(3)]
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logp, rows = target_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    select = labels != -100
    expected = torch.log_softmax(logits[:, :-1][select], -1).gather(-1, labels[select][:, None])[:, 0]
    assert torch.allclose(logp, expected, atol=1e-5), (name, (logp - expected).abs().max())
    if name.startswith("gemma"):
        assert not plain_head(model)  # soft-capping / scaling: the model's own logits are used
    assert len(decoder_layers(model)) == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_two_steps_export_and_reload_with_identical_logits(family_dirs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *tiny_overrides(family_dirs[name], data, out, **{"train.max_steps": 2, "optim.layer_lr_decay": 1.5}),
                "eval.task_file=",
                "data.val_fraction=0",
            ]
        )
        == 0
    )
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


CONVERSATION = [
    {"role": "system", "content": "answer in one word"},
    {"role": "user", "content": "the movie was"},
    {"role": "assistant", "content": "<think>\nshort\n</think>\n\ngreat"},
    {"role": "user", "content": "the plot"},
    {"role": "assistant", "content": "dull"},
]
THOUGHT = "<think>\nshort\n</think>\n\n"
TARGETS = {  # the target tokens of CONVERSATION, decoded: every assistant turn as its family renders it in the whole
    "llama3": f"{THOUGHT}great<|eot_id|>dull<|eot_id|>",
    "qwen2": f"{THOUGHT}great<|im_end|>\ndull<|im_end|>\n",
    "qwen3": "great<|im_end|>\n<think>\n\n</think>\n\ndull<|im_end|>\n",  # the earlier turn's thinking is not rendered
    "mistral": f" {THOUGHT}great<|im_end|> dull<|im_end|>",
    "gemma2": f"{THOUGHT}great<end_of_turn>\ndull<end_of_turn>\n",
    "gemma3": f"{THOUGHT}great<end_of_turn>\ndull<end_of_turn>\n",
    "phi3": f"{THOUGHT}great<|end|>\ndull<|end|>\n<|im_end|>",  # EOS closes the conversation
    "olmo2": f"{THOUGHT}great<|im_end|>dull<|im_end|>",
}
SYSTEM_REFUSED = {  # with the system message: the line a family's template gets instead
    "mistral": "x.jsonl:4: the chat template leaves the system message out of the whole conversation (Mistral's v0.3 "
    "template shows it only with a final user turn), so it would not be trained on; put the system text at "
    "the start of the first user message",
    "gemma2": "x.jsonl:4: the chat template rejected this conversation: System role not supported; "
    "this template has no system turn: put the system text at the start of the first user message "
    "(Gemma-3's template does just that)",
}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_familys_template_masks_exactly_the_assistant_turns(name):
    from fulltune.errors import UserError

    tok = family_tokenizer(name)
    for conversation in (CONVERSATION[1:], CONVERSATION):
        if conversation is CONVERSATION and name in SYSTEM_REFUSED:
            with pytest.raises(UserError) as refused:
                encode_record(tok, {"messages": conversation}, "messages", loss_on="completion", where="x.jsonl:4")
            assert str(refused.value) == SYSTEM_REFUSED[name]
            continue
        ex = encode_record(tok, {"messages": conversation}, "messages", loss_on="completion", where="x.jsonl:4")
        whole = tok.apply_chat_template(conversation, tokenize=False)
        assert ex.input_ids == tok(whole, add_special_tokens=False)["input_ids"]  # the one whole rendering
        assert tok.decode([t for t, m in zip(ex.input_ids, ex.target_mask) if m]) == TARGETS[name]
        if conversation is CONVERSATION:  # the system text is in what the model reads
            assert "answer in one word" in tok.decode(ex.input_ids)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_two_gloo_ranks_follow_the_one_process_trajectory(family_dirs, name, tmp_path):
    """FSDP2 shards each family's decoder layers; Gemma-2 adds soft-capping, eager attention and a
    sliding window, Qwen3 its q/k norms. Packed rows, accumulation, per-layer rates, clipping."""
    from test_distributed import _assert_same_weights, _close, _losses, _torchrun

    from fulltune.config import load_config
    from fulltune.train import run_training

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    settings = {
        "train.max_steps": 3,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "data.packing": True,
        "optim.layer_lr_decay": 1.3,
        "optim.grad_clip": 0.5,
        "data.val_fraction": 0,
        "eval.task_file": "",
    }
    run_training(load_config(None, tiny_overrides(family_dirs[name], data, tmp_path / "one", **settings)))
    proc = _torchrun(tmp_path, tiny_overrides(family_dirs[name], data, tmp_path / "two", **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert _close(one[step]["loss"], two[step]["loss"]) and _close(one[step]["grad_norm"], two[step]["grad_norm"])
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
