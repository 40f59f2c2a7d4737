"""Typed run configuration: YAML + dotted key=value overrides, every mistake reported at once.

Each field carries a one-line doc (``doc``) and, where it has one, a range or a set of choices.
A config holds plain values only; nothing in it can name code to import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fulltune.config_yaml import parse_overrides, read_yaml
from fulltune.errors import UserError, short


def opt(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    """A config field with its one-line doc and its valid range or choices."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt(
        "default", "θ0: an HF model directory (safetensors), a .gguf file, or 'default' (SmolLM2-135M-Instruct)"
    )
    trust_remote_code: bool = opt(
        False, "allow the model directory's own Python code to run (off: only transformers' built-in architectures)"
    )
    activation_checkpointing: bool = opt(
        False,
        "recompute each decoder layer's activations in the backward pass (less memory, one more forward per layer)",
    )
    activation_offload: bool = opt(
        False,
        "CUDA: keep the tensors saved for backward in pinned CPU memory instead of on the GPU (as "
        "torch.autograd.graph.save_on_cpu, but the weights stay where they are)",
    )
    attn_implementation: str = opt(
        "sdpa",
        "attention kernel passed to transformers; flash_attention_2: CUDA with the "
        "flash-attn package (packed rows then take its varlen path)",
        choices=("sdpa", "eager", "flash_attention_2"),
    )


@dataclass
class DataConfig:
    train: str = opt(
        "builtin:sst2/train",
        "training data: a .jsonl/.json/.csv/.parquet file, a datasets save_to_disk directory, "
        "or builtin:sst2/train (SST-2 reviews, the instruction in the user turn) / "
        "builtin:sst2-short/train (the same, the instruction as a short system prompt) / "
        "builtin:boolq/train (BoolQ yes/no questions about a short passage, a system turn) / "
        "builtin:subjects/train (MMLU questions labelled with one of five subjects, a system turn)",
    )
    validation: str = opt("", "validation data (same kinds as train); empty: hold out val_fraction of train")
    val_fraction: float = opt(
        0.0, "fraction of train held out for validation loss when no validation file is given", lo=0.0, hi=0.5
    )
    format: str = opt(
        "auto",
        "record format; auto picks it from the columns: messages (OpenAI chat JSONL too, weight 0 on an "
        "assistant turn: no loss there), conversations (ShareGPT: from/value, human/gpt/system), "
        "prompt+completion, instruction+output (Alpaca, input optional), text",
        choices=("auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca"),
    )
    max_seq_len: int = opt(512, "longest sequence in tokens; longer ones are handled by `overlong`", lo=8)
    overlong: str = opt("truncate", "what to do with sequences longer than max_seq_len", choices=("truncate", "drop"))
    loss_on: str = opt(
        "completion",
        "which tokens carry loss: completion/assistant tokens only, or all tokens",
        choices=("completion", "all"),
    )
    general: list = opt(
        [],
        "general data for data mixing and the EWC Fisher (loss on all its tokens): files like "
        "data.train, or builtin:lambada (5,153 passages of book text)",
    )
    mix_ratio: float = opt(
        0.0,
        "share of each step's sequences drawn from data.general (and data.replay), added to the task's "
        "(e.g. 0.05-0.10); 0: task data only",
        lo=0.0,
        hi=0.9,
    )
    replay: list = opt(
        [],
        "self-distilled replay: prompts θ0 answers once, greedily in its chat template, before step 1 (cached); "
        "the answers are mixed in like data.general (data.mix_ratio > 0), loss on the answer only: "
        "builtin:arc_easy / builtin:piqa / builtin:sciq (questions the probes never score) or a JSONL file "
        'of {"prompt": ...} or {"messages": [...]} ending with a user turn',
    )
    replay_items: int = opt(200, "data.replay: prompts in all, split evenly over its sources", lo=1)
    replay_max_new_tokens: int = opt(96, "data.replay: longest answer θ0 generates, in tokens", lo=1)
    packing: bool = opt(
        False,
        "pack several training sequences into each row of max_seq_len tokens, each attending "
        "only to itself (position ids restart per sequence); micro_batch_size then counts rows",
    )
    group_by_length: bool = opt(
        False,
        "without packing: put sequences of similar length in the same micro-batch (less padding), in a seeded order",
    )


OPTIMIZER_NAMES = (
    "adamw",
    "sgd",
    "adafactor",
    "adamw8bit",
    "adamw4bit",
    "muon",
    "adam_mini",
    "galore",
    "apollo",
    "apollo_mini",
)


@dataclass
class OptimConfig:
    name: str = opt(
        "adamw",
        "optimiser: adamw (8 B/param of state in fp32), adamw8bit (≈2), adamw4bit (≈1; both torchao), "
        "adafactor (factored second moment; lr is a relative step), sgd (0, or 4 with momentum), muon "
        "(torch Muon for the decoder's matrices, 4, AdamW's lr and weight decay; AdamW for the rest), "
        "adam_mini (≈4: one second moment per token, head or neuron; the adam-mini package), galore / "
        "apollo / apollo_mini (Adam on the decoder matrices' gradients projected to optim.rank; the "
        "apollo-torch package)",
        choices=OPTIMIZER_NAMES,
    )
    lr: float = opt(5e-5, "peak learning rate (the top layer's rate with layer_lr_decay)", lo=0.0, lo_open=True)
    weight_decay: float = opt(0.0, "decoupled weight decay, never applied to biases and norm weights", lo=0.0)
    betas: list = opt([0.9, 0.999], "AdamW (beta1, beta2)")
    eps: float = opt(1e-8, "AdamW epsilon", lo=0.0, lo_open=True)
    momentum: float = opt(0.0, "SGD momentum", lo=0.0, hi=1.0)
    rank: int = opt(
        16, "galore / apollo: the projected gradient's rank (apollo_mini: 1); at most each matrix's shorter side", lo=1
    )
    update_proj_gap: int = opt(200, "galore / apollo / apollo_mini: steps between renewals of the projection", lo=1)
    project_embeddings: bool = opt(
        False,
        "galore / apollo / apollo_mini: project the embedding and LM head's gradients too (the floor "
        "preset's setting), not only the decoder's matrices",
    )
    proj_scale: float = opt(
        0.0, "galore / apollo / apollo_mini: the update's scale (0: the method's default: 2 / 32 / 128)", lo=0.0
    )
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (0: off)", lo=0.0)
    cpu_offload: bool = opt(
        False,
        "CUDA: keep the optimiser state in CPU memory and step it there "
        "(torchao CPUOffloadOptimizer, gradients offloaded too)",
    )
    decay_toward: str = opt(
        "zero",
        "weight decay pulls toward zero (plain AdamW) or toward θ0: θ ← θ − lr·wd·(θ − θ0), keeping a copy of θ0",
        choices=("zero", "theta0"),
    )
    layer_lr_decay: float = opt(
        1.0, "ULMFiT ξ: decoder layer l (0 = last) gets lr·ξ^-l; embeddings the lowest rate", lo=1.0
    )


@dataclass
class ScheduleConfig:
    name: str = opt(
        "cosine",
        "warmup then cosine to min_lr, warmup then constant, or warmup then linear to min_lr",
        choices=("cosine", "constant", "linear"),
    )
    warmup_steps: int = opt(-1, "linear warmup steps (-1: use warmup_ratio)", lo=-1)
    warmup_ratio: float = opt(0.05, "warmup as a fraction of all steps when warmup_steps is -1", lo=0.0, hi=1.0)
    min_lr: float = opt(0.0, "learning rate at the end of cosine/linear decay", lo=0.0)


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/quickstart", "run directory: config, metrics, checkpoints, final model")
    seed: int = opt(0, "seed for data order, held-out split and initial RNG; same seed, same run", lo=0, hi=2**31 - 1)
    precision: str = opt(
        "auto",
        "fp32; bf16-mixed: fp32 weights + bf16 autocast; bf16: pure bf16 weights and gradients, "
        "no fp32 copy, stochastically rounded updates; auto: bf16-mixed where the hardware has "
        "bf16 units, else fp32 (auto never picks pure bf16)",
        choices=("auto", "fp32", "bf16-mixed", "bf16"),
    )
    force_precision: bool = opt(
        False,
        "train in the precision asked for even where it is slow (pure bf16 on a CPU "
        "without bf16 units); a warning instead of an error",
    )
    tf32: bool = opt(
        True,
        "CUDA: fp32 matmuls (fp32 runs, and what autocast leaves in fp32) in TF32 on Ampere and later, "
        "about 8x faster, fp32 range with a 10-bit mantissa in the products; false: IEEE fp32. "
        "Nothing changes on CPU",
    )
    optimizer_in_backward: bool = opt(
        False,
        "update each parameter as soon as its gradient is complete and free that "
        "gradient (no whole-model gradients); needs grad_accum_steps 1; with optim.grad_clip each step "
        "runs forward and backward twice (the first measures the global norm): the ordinary clipped step",
    )
    memory: str = opt(
        "default",
        "lean: the measured best-quality low-memory setup for this device; floor: the least model "
        "state fulltune trains with (bf16 weights, APOLLO-Mini on every matrix, the step in backward); "
        "each is printed at the start, replaces the config file's values, and key=value overrides on "
        "the command line win over it",
        choices=("default", "lean", "floor"),
    )
    micro_batch_size: int = opt(
        8, "sequences per forward/backward pass (under FSDP2: at most this many per rank)", lo=1
    )
    grad_accum_steps: int = opt(
        1,
        "micro-batches per optimiser step (loss normalised by all their target tokens); "
        "the step's micro_batch_size × grad_accum_steps sequences are split over the ranks",
        lo=1,
    )
    epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", lo=0.0, lo_open=True)
    max_steps: int = opt(0, "optimiser steps to run; 0: derive from epochs", lo=0)
    log_interval: int = opt(1, "write a metrics.jsonl line every N steps", lo=1)
    report: bool = opt(True, "write RUN/report.html when the run ends (fulltune report RUN_DIR writes it any time)")
    tensorboard: bool = opt(
        False,
        "also write metrics.jsonl's numbers as TensorBoard scalars in RUN/tensorboard/ (tensorboard --logdir runs/); "
        "the same as naming tensorboard in train.loggers",
    )
    loggers: list = opt(
        [],
        "trackers that get every metrics.jsonl record, and at the end the forgetting verdicts and the run's files: "
        "tensorboard, mlflow (MLFLOW_TRACKING_URI, else RUN/mlflow.db), wandb (offline in RUN/wandb/ unless W&B "
        "is configured); mlflow and wandb are extras: pip install 'fulltune[mlflow]' / 'fulltune[wandb]'",
    )
    val_interval: int = opt(0, "validation loss every N steps (0: only at the end)", lo=0)
    save_interval: int = opt(0, "checkpoint every N steps (0: only at the end)", lo=0)
    keep_checkpoints: int = opt(2, "how many periodic checkpoints to keep (oldest removed first)", lo=1)
    resume: str = opt("", "resume from a checkpoint: auto (latest in output_dir/checkpoints) or a checkpoint path")
    allow_schedule_change: bool = opt(
        False,
        "on resume, accept a changed max_steps / epochs (the lr curve is "
        "re-stretched from the checkpoint's step on; the log shows old and new)",
    )
    max_bad_steps: int = opt(
        3,
        "stop after this many non-finite steps in a row (each one's update is skipped); "
        "the last good checkpoint is kept",
        lo=1,
    )
    overwrite: bool = opt(False, "allow starting a fresh run in an output_dir that already holds one")
    allow_long_run: bool = opt(
        False, "allow a run of more than 10,000,000 optimiser steps (without it such a length is refused as a typo)"
    )
    compile: bool = opt(
        False, "torch.compile each decoder layer (the first steps include the compile time, printed on its own)"
    )
    compile_fallback: bool = opt(
        False,
        "with train.compile: if compiling fails, run that code uncompiled (torch "
        "prints a warning) instead of stopping with an error",
    )
    peak_probe_s: float = opt(
        1.0,
        "seconds spent at the start measuring the device's matmul peak in the run's dtype "
        "(the denominator of MFU in metrics.jsonl); 0: no MFU",
        lo=0.0,
    )
    device: str = opt("auto", "where to train; auto: cuda when available", choices=("auto", "cpu", "cuda"))
    progress: bool = opt(True, "show a progress bar")
    memory_steps: int = opt(
        3,
        "measure the memory peak over the first N steps, then train at full speed (CPU: glibc made to "
        "free at once, slower steps; CUDA: two device syncs a step); 0: no peak check",
        lo=0,
    )


@dataclass
class EvalConfig:
    task_file: str = opt("", "records scored for task accuracy (their last answer is the gold label); empty: off")
    labels: list = opt([], "the fixed label set compared by log-likelihood, e.g. [positive, negative]")
    batch_size: int = opt(
        16,
        "rows per forward pass when scoring; a row holds one context with all its candidates (labels, choices)",
        lo=1,
    )
    probes: list = opt(
        [],
        "general-skill probes run on θ0, during and after training: arc_easy, piqa, sciq, "
        "humaneval, mbpp, or mc:FILE.jsonl / text:FILE.jsonl, or lmeval:TASK (arc_easy, arc_challenge, piqa, "
        "sciq, hellaswag, boolq, csqa, openbookqa: the same item subsets scored by lm-evaluation-harness, "
        "pip install 'fulltune[lmeval]')",
    )
    probe_items: int = opt(50, "items per multiple-choice probe (a fixed seeded subset)", lo=1)
    probe_code_items: int = opt(30, "items per code / text probe", lo=1)
    probe_interval: int = opt(0, "also run the probes every N steps (0: only before and after)", lo=0)
    forgetting_budget: dict = opt(
        {},
        "the most each probe may lose from θ0, e.g. {arc_easy: 2, humaneval: 5}: accuracy "
        "points (multiple choice) or % of NLL (code / text); the best task score inside it "
        "among the probed steps is kept in RUN/best-in-budget/",
    )
    budget_rule: str = opt(
        "significant",
        "how a probe's change is held to its limit, with its paired 95 % interval: significant (over "
        "only when the whole interval is beyond the limit), strict (within only when the whole "
        "interval is inside), point (the point estimate alone, noise included)",
        choices=("significant", "strict", "point"),
    )
    drift: bool = opt(
        True,
        "measure KL(θ0 ‖ θ) per token at every validation point, on the held-out task sequences' answers "
        "and on general text, from θ0's top-k next-token distributions kept before step 1 (no θ0 in memory)",
    )
    drift_general: int = opt(8, "general-text passages for the drift monitor (LAMBADA's last ones)", lo=0)
    theta0_cache: bool = opt(
        True,
        "reuse θ0's task and probe scores from an earlier run on the same model, items, precision and "
        "device ($FULLTUNE_HOME/theta0-scores/)",
    )


@dataclass
class AnchorConfig:
    method: str = opt(
        "none",
        "regularise toward θ0: L2-SP adds λ/2·‖θ − θ0‖²; EWC adds λ/2·Σ F·(θ − θ0)² with a "
        "diagonal Fisher F from data.general",
        choices=("none", "l2sp", "ewc"),
    )
    lam: float = opt(0.0, "λ, the penalty's strength (0: no penalty, exactly the unregularised run)", lo=0.0)
    fisher_batches: int = opt(
        16, "EWC: batches of data.general (micro_batch_size sequences each) for the Fisher, cached beside the run", lo=1
    )
    fisher_normalize: bool = opt(True, "EWC: divide F by its mean, so λ has the same scale as in L2-SP")


@dataclass
class LossConfig:
    type: str = opt(
        "ce",
        "the training loss per target token: ce (cross-entropy, −log p) or dft (Dynamic Fine-Tuning: "
        "−sg(p)·log p, each token's CE weighted by its own probability, gradient stopped)",
        choices=("ce", "dft"),
    )
    kl_to_theta0: float = opt(
        0.0,
        "β: add β·KL(p_θ0 ‖ p_θ) at each target token, θ0's distribution from loss.kl_reference (live: "
        "a frozen θ0 copy, weight-dtype bytes per parameter, its forward each micro-batch); with type dft this "
        "is ASFT; 0: off, exactly the run without it",
        lo=0.0,
    )
    kl_reference: str = opt(
        "live",
        "where θ0's distributions for kl_to_theta0 come from: live (a frozen θ0 copy, its forward each "
        "micro-batch, the full vocabulary: exact) or cached (θ0 scored once before step 1 at every trainable "
        "target, its top 256 tokens + the tail kept, 2 KB a target position: no copy, no second forward; a "
        "lower bound of the KL, 0.91-0.97 of it as measured in docs/drift.md)",
        choices=("live", "cached"),
    )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # The keys a preset (train.memory: lean) set when the config was loaded; not a config key itself.
        self.preset_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def get(self, dotted: str) -> Any:
        """The value at a dotted key, e.g. cfg.get("optim.lr")."""
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)


def _check_value(key: str, f: dataclasses.Field, kind: type, value: Any, *, errors: list[str]) -> Any:
    """Coerce `value` to the field's type and check its range; append problems to `errors`."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML reads 5e-5 (no dot) as a string
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if not ok:
        errors.append(f"{key}: expected {kind.__name__}, got {type(value).__name__} {short(value)}")
        return value
    if kind is float and not math.isfinite(value):
        errors.append(f"{key}: {short(value)} must be a finite number")
        return value
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        errors.append(f"{key}: {short(value)} is not one of {', '.join(map(str, m['choices']))}")
    if m.get("lo") is not None and (value < m["lo"] or (m["lo_open"] and value == m["lo"])):
        errors.append(f"{key}: {short(value)} must be {'>' if m['lo_open'] else '>='} {m['lo']}")
    if m.get("hi") is not None and value > m["hi"]:
        errors.append(f"{key}: {short(value)} must be <= {m['hi']}")
    return value


def _build(cls: type, raw: dict, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, collecting unknown keys, wrong types and ranges."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            errors.append(f"{full}: unknown key (valid: {', '.join(fields)})")
            continue
        if dataclasses.is_dataclass(hints[key]):
            value = {} if value is None else value  # an empty YAML section: its defaults
            if not isinstance(value, dict):
                errors.append(f"{full}: expected a section (mapping), got {short(value)}")
                continue
            kwargs[key] = _build(hints[key], value, full + ".", errors)
        else:
            kwargs[key] = _check_value(full, fields[key], hints[key], value, errors=errors)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty YAML section (`train:` with its keys commented out)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(
                f"{'.'.join(parts[: i + 1])}: expected a section (mapping), got {short(node)}; the override "
                f"{dotted} sets a key inside it"
            )
    node[parts[-1]] = value


def _apply_preset(raw: dict, pairs: list[tuple[str, Any]]) -> tuple[str, ...]:
    """train.memory=lean or floor: its settings replace the config file's; key=value overrides still
    win. Returns the keys it set."""
    final = copy.deepcopy(raw)  # the config as it will be, to read train.memory and grad_accum_steps from
    for key, value in pairs:
        _set_dotted(final, key, value)
    train = final.get("train")
    if not (isinstance(train, dict) and train.get("memory") in ("lean", "floor")):
        return ()
    from fulltune.runtime import floor_settings, lean_settings

    settings = (lean_settings if train["memory"] == "lean" else floor_settings)(final)
    for key, value in settings.items():
        _set_dotted(raw, key, value)
    return tuple(settings)


def _from_command_line(error: str, overridden: set[str]) -> bool:
    """Whether a problem's key was set (or created) by a key=value override: the key itself, a key
    inside it, or a section the override made (a misspelled `optimm.lr=1` makes `optimm`)."""
    key = error.split(":")[0]
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in overridden)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply overrides, validate everything, and return a RunConfig."""
    from fulltune.config_checks import cross_checks

    raw: dict = read_yaml(Path(path)) if path is not None else {}
    pairs = parse_overrides(list(overrides))
    try:
        preset_keys = _apply_preset(raw, pairs)
        for key, value in pairs:
            _set_dotted(raw, key, value)
    except UserError as exc:  # a section of the file that is not a mapping, met by an override
        raise UserError(f"invalid config{f' in {path}' if path else ''} (1 problem):\n  {exc}") from None
    errors: list[str] = []
    cfg = _build(RunConfig, raw, "", errors)
    errors += cross_checks(cfg) if not errors else []  # cross-checks compare values of the right types only
    if errors:
        overridden = {key for key, _ in pairs}
        marked = [e + " (set on the command line)" * _from_command_line(e, overridden) for e in errors]
        where = f" in {path}" if path and not all(e.endswith("(set on the command line)") for e in marked) else ""
        raise UserError(
            f"invalid config{where} ({len(marked)} problem{'s' * (len(marked) > 1)}):\n  " + "\n  ".join(marked)
        )
    cfg.preset_keys = preset_keys
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def describe_fields() -> str:
    """Markdown table of every config key with its default and doc (for the README)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(typing.get_type_hints(RunConfig)[section.name]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += f" ({' / '.join(f.metadata['choices'])})"
            rows.append(f"| `{section.name}.{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(rows)
