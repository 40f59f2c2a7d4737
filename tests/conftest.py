"""Fixtures: a tiny random-init Llama with a real byte-level BPE tokenizer and chat template,
saved as an HF directory, plus small data files in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WORDS = ("the movie was great fun and the plot was dull boring slow film actors good bad review "
         "positive negative classify sentiment answer one word what is capital of france paris").split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, layers: int = 3, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """An HF model directory: tiny Llama (tied embeddings) + tokenizer with a chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_model(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, 12, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)]
        label = "positive" if i % 2 == 0 else "negative"
        out.append({"messages": [{"role": "user", "content": "classify " + " ".join(words)},
                                 {"role": "assistant", "content": label}]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", sentiment_records(24))


def tiny_overrides(model_dir: Path, train_file: Path, out: Path, **extra) -> list[str]:
    """Overrides that make a fast, deterministic fp32 CPU run on the tiny model."""
    base = {"model.path": str(model_dir), "data.train": str(train_file), "data.max_seq_len": 64,
            "train.output_dir": str(out), "train.precision": "fp32", "train.device": "cpu",
            "train.micro_batch_size": 4, "train.progress": False, "optim.lr": 1e-3,
            "schedule.warmup_steps": 1, "eval.probes": "[]", "train.peak_probe_s": 0.02,
            "train.report": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
