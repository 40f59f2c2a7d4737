"""Load θ0 and check it: every weight from the file, every weight trainable, fp32 master copy."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from fulltune import assets
from fulltune.config import ModelConfig
from fulltune.errors import UserError, input_path
from fulltune.modelcheck import check_model_path


def resolve_model_path(path: str) -> Path:
    if path == "default":
        return assets.ensure_model()
    return input_path(Path(path).expanduser(), "model.path")


def _load_hf_dir(path: Path, cfg: ModelConfig):
    """θ0 from an HF directory that `modelcheck.check_model_dir` has passed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = _with_attention(
        cfg,
        lambda attn: AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.float32,
            use_safetensors=True,
            output_loading_info=True,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=attn,
        ),
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:5]))}"
            + (f" (+{len(v) - 5} more)" if len(v) > 5 else "")
            for k, v in problems.items()
        )
        raise UserError(
            f"{path}: the checkpoint does not match the architecture, some weights would be "
            f"randomly initialised or dropped ({detail})"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer


def _with_attention(cfg: ModelConfig, build):
    """build(attn_implementation); an architecture without SDPA in transformers (Gemma-2's soft-capped
    attention) gets the eager kernel, said in one line, rather than a traceback."""
    try:
        return build(cfg.attn_implementation)
    except ValueError as exc:
        if cfg.attn_implementation != "sdpa" or "does not support an attention implementation" not in str(exc):
            raise
    print(
        "[model] this architecture has no SDPA attention in transformers: using attn_implementation=eager", flush=True
    )
    return build("eager")


def _meta_hf_model(path: Path, cfg: ModelConfig):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = _with_attention(
            cfg,
            lambda attn: AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, attn_implementation=attn
            ),
        )
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def load_theta0(cfg: ModelConfig, verbose: bool = True, weights: bool = True):
    """(model, tokenizer, path): θ0 in fp32 with every parameter trainable, checked.

    weights=False: the same architecture on the meta device, no weights read (an FSDP2 rank that
    receives its shards from rank 0); a .gguf file is always read in full."""
    path = resolve_model_path(cfg.path)
    check_model_path(str(path), cfg.trust_remote_code)  # one line per fault, before the slow load
    if path.is_file() and path.suffix == ".gguf":
        try:
            model, tokenizer = assets.gguf_to_model(path, cfg.trust_remote_code)
        except ValueError as exc:  # gguf's own checks: magic bytes, version, tensor types
            raise UserError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        model.config._attn_implementation = cfg.attn_implementation
    elif not weights:
        model, tokenizer = _meta_hf_model(path, cfg)
    else:
        model, tokenizer = _load_hf_dir(path, cfg)
    model.requires_grad_(True)
    model.train()
    if tokenizer.pad_token_id is None:
        # Only used to fill padded positions; they are masked by length, never by id.
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    summary = verify_trainable(model)
    if verbose:
        print(f"[model] θ0 {path}: {summary}", flush=True)
    return model, tokenizer, path


def verify_trainable(model: nn.Module) -> str:
    """Assert the full fine-tuning invariant and describe the model in one line."""
    params = list(model.parameters())  # shared (tied) tensors appear once
    trainable = [p for p in params if p.requires_grad]
    n_total = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in trainable)
    if n_train != n_total:
        raise UserError(f"only {n_train}/{n_total} parameters are trainable; full fine-tuning trains all")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    tied = (
        model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    return (
        f"{type(model).__name__}, {n_total:,} parameters in {len(params)} tensors, "
        f"trainable {n_train:,} (100.00%), dtype {'/'.join(dtypes)}, tied embeddings: {'yes' if tied else 'no'}"
    )


def compile_layers(model: nn.Module, fallback: bool, device_type: str = "cpu") -> int:
    """train.compile: torch.compile each decoder layer's forward (one graph, reused by every layer of
    the same shape). The module's hooks (FSDP2's gathers, activation checkpointing) stay outside the
    compiled code, in eager mode. `fallback`: a frame that fails to compile runs eagerly, with
    torch's warning, instead of stopping the run (dynamo's suppress_errors, set only while a layer runs).

    No global torch config is changed: the inductor options travel with each compiled function and
    dynamo's setting is patched around each call, so a library caller (or the next test) finds
    torch as it was."""
    options = inductor_options(device_type, inductor_cpu_isa() if device_type == "cpu" else "")
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _compiled(layer.forward, options, fallback)
    note = ""
    if options.get("pattern_matcher") is False:
        note = "; inductor vectorises for AVX2 here: its pattern rewrites are off (they gave NaN in training steps)"
    print(
        f"[model] torch.compile: {len(layers)} decoder layers (compiled at the first forward passes; step 1's time "
        f"is printed){note}",
        flush=True,
    )
    return len(layers)


def inductor_options(device_type: str, isa: str) -> dict:
    """Inductor settings for this machine's compiled layers. Where inductor vectorises CPU code for
    AVX2 (no AVX512), its pattern rewrites are off: with them, the compiled layers of SmolLM2-135M
    gave NaN in the first training step (fp32, 8 packed rows of 256; torch 2.13, measured with
    ATEN_CPU_CAPABILITY=avx2 on an AVX512 Xeon), and without them the same step matched eager."""
    return {"pattern_matcher": False} if device_type == "cpu" and isa == "avx2" else {}


def _compiled(forward, options: dict, fallback: bool):
    import torch._dynamo

    compiled = torch.compile(forward, options=options or None)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(suppress_errors=fallback):
            return compiled(*args, **kwargs)

    run.inductor_options = dict(options)  # what it was compiled with (tests, the log)
    return run


def inductor_cpu_isa() -> str:
    """The vector instruction set inductor generates CPU code for ("avx2", "avx512", "amx", ...)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return str(pick_vec_isa()).strip().lower()
    except Exception:  # a private API: never let it stop a run
        return "unknown"


def compile_failure(exc: BaseException) -> str | None:
    """The one-line cause when `exc` is torch.compile failing (dynamo, inductor, the C++ compiler)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    if not isinstance(exc, (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next(
        (line for line in lines if "Error" in line or "error" in line), lines[0] if lines else type(exc).__name__
    )
    return f"{type(exc).__name__}: {cause[:240]}"


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Each decoder layer recomputed in backward (non-reentrant), under either name transformers has used."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # older transformers (the GPU image's)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The parameters in `dtype`, the buffers as they are: `model.to(dtype)` would also cast RoPE's
    `inv_freq`, which in bf16 is up to 0.33 % off, and cos at position 2,000 then by up to 1.6 (on a
    range of ±1; SmolLM2-135M). transformers computes the rotary angles in fp32 from this buffer."""
    for p in model.parameters():  # a tied tensor is listed once
        p.data = p.data.to(dtype)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ordered decoder blocks (bottom first): the key for per-layer rates, sharding, memory."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(f"{type(model).__name__}: cannot find the decoder layers (looked for layers, h, blocks)")
