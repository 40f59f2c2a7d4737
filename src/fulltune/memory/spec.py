"""The shape of a model, as the memory estimator needs it: no weights, no download.

A spec comes from a local config.json / HF directory or from a built-in preset; the parameter
count is exact because the model is built on the meta device (no memory) and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fulltune.errors import UserError

# LLaMA-family shapes (config.json values of the published checkpoints). `nominal` is the size
# in the model's name, which the seed's 16N table uses.
PRESETS: dict[str, dict] = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        nominal=7e9,
    ),
    "llama-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
        nominal=13e9,
    ),
    "llama-65b": dict(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        vocab_size=32000,
        tie_word_embeddings=False,
        nominal=65e9,
    ),
    "llama-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=False,
        nominal=70e9,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        nominal=8e9,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        nominal=70e9,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        nominal=135e6,
    ),
    "smollm2-360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        vocab_size=49152,
        tie_word_embeddings=True,
        nominal=360e6,
    ),
    "smollm2-1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        tie_word_embeddings=True,
        nominal=1.7e9,
    ),
    "llama3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        nominal=8e9,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        nominal=1.2e9,
    ),
    "llama3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        nominal=3.2e9,
    ),
    # Other architectures by their own transformers class (exact counts: Qwen2's q/k/v biases,
    # Gemma-2's four norms per layer).
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        nominal=0.5e9,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        nominal=1.5e9,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        nominal=7.6e9,
    ),
    "gemma2-2b": dict(
        model_type="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
        tie_word_embeddings=True,
        nominal=2.6e9,
    ),
}
PRESETS["llama3.1-70b"] = PRESETS["llama3-70b"]  # 3.1 changed the RoPE scaling and the context, not the sizes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_params: int  # exact, tied tensors counted once
    n_matmul_params: int  # weights of the linear layers and the LM head (cast to bf16 under autocast)
    n_embed_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    nominal: float  # the size in the model's name (seed mode)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def largest_layer_params(self) -> int:
        return (self.n_params - self.n_embed_params * (1 if self.tied else 2)) // self.layers


def _count(config) -> tuple[int, int, int]:
    """(all, matmul, embedding) parameter counts of `config` built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_embed = model.get_input_embeddings().weight.numel()
    # n_matmul holds the LM head once (tied or not): it is an nn.Linear; a tied input embedding
    # is that same tensor, an untied one is an nn.Embedding and is not cast by autocast.
    return n_all, n_matmul, n_embed


def spec_from_config(config, name: str, nominal: float | None = None) -> ModelSpec:
    n_all, n_matmul, n_embed = _count(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        name=name,
        n_params=n_all,
        n_matmul_params=n_matmul,
        n_embed_params=n_embed,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(config.tie_word_embeddings),
        nominal=nominal or float(n_all),
    )


def load_spec(model: str) -> ModelSpec:
    """A preset name, an HF model directory or a config.json path → ModelSpec."""
    from transformers import AutoConfig, LlamaConfig

    key = model.lower()
    if key in PRESETS:
        fields = dict(PRESETS[key])
        nominal, model_type = fields.pop("nominal"), fields.pop("model_type", "llama")
        config = LlamaConfig(**fields) if model_type == "llama" else AutoConfig.for_model(model_type, **fields)
        return spec_from_config(config, key, nominal)
    if key == "default":
        from fulltune.assets import ensure_model

        model = str(ensure_model())
    path = Path(model).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        config = AutoConfig.for_model(**raw)
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
    else:
        raise UserError(
            f"unknown model {model!r}: give a preset ({', '.join(PRESETS)}), an HF model directory or a config.json"
        )
    for key_name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not hasattr(config, key_name):
            raise UserError(f"{path}: config has no {key_name}; the estimator covers LLaMA-style decoders")
    return spec_from_config(config, path.name)
