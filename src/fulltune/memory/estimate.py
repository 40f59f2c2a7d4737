"""Memory of a training setup, per tensor kind and dtype, with the peak per GPU.

Every term says what it assumes (`note`). Activation terms are what HF's Llama-family decoder
with SDPA attention saves for backward, counted tensor by tensor (see docs/memory.md): per layer
and token, in bytes, with h hidden, I intermediate, k = KV heads × head dim, a heads:
    bf16-mixed (fp32 weights + bf16 autocast):               30h + 8I + 4k + 4a + 8
    fp32 everything:                                          32h + 16I + 8k + 4a + 8
    bf16 weights (bf16, bf16-master):                         20h + 8I + 4k + 4a + 8
No s² term: SDPA/flash attention keeps only the output and a log-sum-exp per head.

Precisions use the config's names (runtime.py): fp32, bf16-mixed, bf16; bf16-master (bf16 weights +
an fp32 master copy: the 16N layout of ZeRO/DeepSpeed) is here for comparison and is not trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fulltune.memory.spec import ModelSpec

GB = 1e9
PRECISIONS = ("bf16-mixed", "bf16", "fp32", "bf16-master")
TRAINED_PRECISIONS = ("bf16-mixed", "bf16", "fp32")
OPTIMIZERS = (
    "adamw", "adamw8bit", "adamw4bit", "sgd", "sgd-momentum", "adafactor", "muon", "adam_mini", "galore", "apollo",
    "apollo_mini",
)  # fmt: skip
PROJECTED_RANK = {"galore": 16, "apollo": 16, "apollo_mini": 1}  # optim.rank's default (apollo_mini: always 1)
# torchao's low-bit AdamW states: (bits per value, values per fp32 scale); tensors under 4096 values,
# or not a multiple of the block, keep m and v unquantised in the weights' dtype.
LOW_BIT = {"adamw8bit": (8, 256), "adamw4bit": (4, 128)}
# Their step dequantises one tensor at a time into fp32 temporaries: bytes per value of the tensor
# being stepped, measured on CPU around optimizer.step() on SmolLM2-135M's shapes (the 28.3M-value
# embedding; bench/rounded_step_memory.py): 227 MB for torchao's 8-bit step, 568 MB for the 4-bit
# one through optim/lowbit_cpu.py, on fp32 or bf16 weights (torchao's own 4-bit step: 752 MB, 26 B;
# on a GPU torchao's kernel runs, its temporaries unmeasured).
LOW_BIT_STEP_BYTES = {"adamw8bit": 8, "adamw4bit": 20}
LOW_BIT_STEP_SLICE = 1 << 25  # optim/lowbit_cpu.STEP_SLICE: the CPU 4-bit step's largest piece (tests hold them equal)
# Pure bf16 SGD / Adafactor / Muon (optim/rounding.py): one tensor at a time in fp32 — its weight and
# gradient (8 B), the rounding's int32 noise (4 B), and its states (4 B each, their bf16 originals
# dropped meanwhile: +2 B each), per value of the largest tensor (Muon's largest, the embedding, is
# AdamW's: two states). Measured on CPU around optimizer.step() on SmolLM2-135M's 28.3M-value
# embedding (bench/rounded_step_memory.py: 14.0, 12.0 and 16.0 B; SGD without momentum by the count).
ROUNDED_STEP_BYTES = {"sgd": 12, "sgd-momentum": 14, "adafactor": 12, "muon": 16, "galore": 16, "apollo": 16}
ROUNDED_STEP_BYTES["apollo_mini"] = 16  # the projected ones' largest tensor, the embedding, is AdamW's too
METHODS = ("full", "lora", "qlora")
ANCHORS = ("none", "l2sp", "ewc")  # θ0 copy (L2-SP, decay toward θ0); θ0 + Fisher (EWC)
CUDA_CONTEXT = 0.5 * GB  # 287–667 MB measured by PyTorch (PR #86509); 0.5 GB as a round middle


@dataclass(frozen=True)
class TrainSetup:
    micro_batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16-mixed"  # fp32 weights + bf16 autocast (see the module doc for the others)
    optimizer: str = "adamw"
    rank: int = 0  # optim.rank for galore / apollo (0: its default)
    project_embeddings: bool = False  # optim.project_embeddings: the embedding and head projected too
    fp32_grads: bool = False  # mixed precision with fp32 gradient accumulation
    activation_checkpointing: bool = False
    gpus: int = 1
    zero_stage: int = 0
    method: str = "full"
    lora_rank: int = 16
    loss_fraction: float = 1.0  # share of positions with loss; fulltune runs the LM head only there
    device: str = "cuda"
    anchor: str = "none"  # regularisation toward θ0 keeps θ0 (and EWC's F) beside the weights
    grad_accum: int = 1  # micro-batches per step: after the first, every gradient is alive
    optimizer_in_backward: bool = False  # each parameter updated in backward, its gradient freed at once
    activation_offload: bool = False  # CUDA: saved activations in pinned CPU memory
    cpu_offload: bool = False  # CUDA: optimiser state (and gradients) in CPU memory, stepped there
    kl_theta0: bool = False  # loss.kl_to_theta0 > 0: θ0's distribution in the loss at each target position
    kl_live: bool = True  # ... from a frozen θ0 model beside the weights (loss.kl_reference live), not a cache

    def __post_init__(self):
        assert self.precision in PRECISIONS and self.optimizer in OPTIMIZERS and self.method in METHODS
        assert self.anchor in ANCHORS and self.grad_accum >= 1
        assert 0 <= self.zero_stage <= 3 and self.gpus >= 1 and 0 < self.loss_fraction <= 1


@dataclass
class Term:
    name: str
    bytes: float
    note: str
    group: str  # "states" (kept all run) or "transient" (alive in forward/backward)


@dataclass
class Estimate:
    spec: ModelSpec
    setup: TrainSetup
    terms: list[Term] = field(default_factory=list)
    peak: float = 0.0
    peak_when: str = ""

    def get(self, name: str) -> float:
        return sum(t.bytes for t in self.terms if t.name == name)

    @property
    def states(self) -> float:
        return sum(t.bytes for t in self.terms if t.group == "states")


def weight_bytes(precision: str) -> int:
    return 4 if precision in ("bf16-mixed", "fp32") else 2


def grad_bytes(precision: str, fp32_grads: bool = False) -> int:
    return 4 if precision in ("bf16-mixed", "fp32") or fp32_grads else 2


def master_bytes(precision: str) -> int:
    return 4 if precision == "bf16-master" else 0


def _layer_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(rows, cols) of one decoder layer's weights: 7 matrices, 2 norm vectors as (n, 1)."""
    h, i, k = spec.hidden, spec.intermediate, spec.kv_dim
    q = spec.heads * spec.head_dim
    return [(q, h), (k, h), (k, h), (h, q), (i, h), (i, h), (h, i), (h, 1), (h, 1)]


def _matrix_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(rows, cols) of every weight matrix; vectors as (n, 1)."""
    shapes = _layer_shapes(spec) * spec.layers + [(spec.vocab, spec.hidden), (spec.hidden, 1)]
    if not spec.tied:
        shapes.append((spec.vocab, spec.hidden))
    return shapes


def _low_bit_state(numel: int, optimizer: str, state: int) -> float:
    """One torchao state tensor (m or v): codes, an fp32 scale per block and its 2^bits-entry fp32 code map."""
    bits, block = LOW_BIT[optimizer]
    if numel >= 4096 and numel % block == 0:
        return numel * bits / 8 + 4 * numel / block + 4 * 2**bits
    return numel * state


def optimizer_state_bytes(
    spec: ModelSpec, optimizer: str, precision: str, rank: int = 0, project_embeddings: bool = False
) -> float:
    """Bytes of optimiser state for the whole model (besides a bf16-master copy), tensor by tensor."""
    n = spec.n_params
    state = 2 if precision == "bf16" else 4  # states in the parameter's dtype (fp32 for a master copy)
    shapes = _matrix_shapes(spec)
    others = n - sum(r * c for r, c in shapes)  # e.g. attention biases (Qwen2): small vectors
    if optimizer == "adamw":
        return 2 * state * n
    if optimizer in LOW_BIT:
        return 2 * (sum(_low_bit_state(r * c, optimizer, state) for r, c in shapes) + others * state)
    if optimizer == "sgd":
        return 0.0
    if optimizer in PROJECTED_RANK:  # per projected matrix m ≥ n: m and v of m·r, the projection r·n (fp32)
        r = 1 if optimizer == "apollo_mini" else rank or PROJECTED_RANK[optimizer]
        hidden = [(a, b) for a, b in _layer_shapes(spec) if b > 1] * spec.layers
        if project_embeddings:
            hidden += [(spec.vocab, spec.hidden)] * (1 if spec.tied else 2)
        moments = sum(2 * r * max(a, b) for a, b in hidden)
        projections = sum(r * min(a, b) for a, b in hidden)
        return state * moments + 4 * projections + 2 * state * (n - sum(a * b for a, b in hidden))
    if optimizer == "adam_mini":  # m per weight; v per token (embedding, head), head (q, k), row (the rest)
        h, heads, kv, i = spec.hidden, spec.heads, spec.kv_heads, spec.intermediate
        blocks = spec.vocab * (1 if spec.tied else 2) + spec.layers * (heads + kv + spec.kv_dim + h + 2 * i + h)
        return state * (n + blocks)  # a norm's one v is a 0-d tensor (not counted, as measure.state_bytes)
    if optimizer == "muon":  # a momentum buffer per decoder matrix (optim/muon.py), AdamW's m and v for the rest
        hidden = spec.layers * sum(r * c for r, c in _layer_shapes(spec) if c > 1)
        return state * hidden + 2 * state * (n - hidden)
    if optimizer == "sgd-momentum":
        return state * n
    # Adafactor without momentum: a row and a column second moment per matrix, full for vectors.
    return state * (sum(r + c if c > 1 else r for r, c in shapes) + others)


def optimizer_bytes_per_param(spec: ModelSpec, optimizer: str, precision: str) -> float:
    return (optimizer_state_bytes(spec, optimizer, precision) + master_bytes(precision) * spec.n_params) / spec.n_params


def activation_bytes_per_token_layer(spec: ModelSpec, precision: str) -> int:
    h, i, k, a = spec.hidden, spec.intermediate, spec.kv_dim, spec.heads
    if precision == "bf16-mixed":
        return 30 * h + 8 * i + 4 * k + 4 * a + 8
    if precision == "fp32":
        return 32 * h + 16 * i + 8 * k + 4 * a + 8
    return 20 * h + 8 * i + 4 * k + 4 * a + 8


def activations(spec: ModelSpec, s: TrainSetup) -> tuple[float, str]:
    """Saved activations of the decoder stack for one micro-batch, and what was assumed."""
    tokens = s.micro_batch * s.seq_len
    per_layer = activation_bytes_per_token_layer(spec, s.precision)
    outside = (6 if s.precision in ("bf16-master", "bf16") else 8) * spec.hidden + 12  # embedding output, final norm
    if s.activation_offload:
        # every saved tensor but the weights goes to pinned host memory as it is saved: the GPU holds the
        # layer being computed (and, in backward, the one being brought back).
        return 2 * tokens * per_layer, f"offloaded to CPU: about two layers' ({per_layer} B/token each) on the GPU"
    if s.activation_checkpointing:
        kept = weight_bytes(s.precision) * spec.hidden  # each layer keeps only its input
        total = tokens * (spec.layers * kept + per_layer + outside)
        return total, f"checkpointing: {kept} B/token/layer kept + one layer recomputed ({per_layer} B/token)"
    return tokens * (
        spec.layers * per_layer + outside
    ), f"{per_layer:,} B/token/layer saved for backward (SDPA, no s² term)"


def logits_bytes(spec: ModelSpec, s: TrainSetup) -> tuple[float, str]:
    """Peak of the LM head + loss: logits, their fp32 copy / log-softmax, and the logits' gradient."""
    positions = s.micro_batch * s.seq_len * s.loss_fraction
    # Measured in isolation on CPU (docs/memory.md): 11.5–11.6 B per position·V for head + loss +
    # backward, with bf16 autocast and in fp32 alike (log-softmax output, exp temporary, gradients).
    per = 12
    # loss.kl_to_theta0: θ0's fp32 probabilities, kept for backward, and its logits while they are made
    # (counted from the tensors, not measured): 8·V more per position.
    per += 8 if s.kl_theta0 else 0
    kl = ", θ0's logits and probabilities for the KL included" if s.kl_theta0 else ""
    return positions * spec.vocab * per, f"{per}·V B per position with loss ({positions:,.0f} positions{kl})"


def _sharded(stage: int, needed: int, gpus: int) -> int:
    return gpus if stage >= needed else 1


def _lora_params(spec: ModelSpec, rank: int) -> int:
    """Adapter parameters: A (r×in) and B (out×r) on every linear layer of every decoder block."""
    per_layer = [(r, c) for r, c in _matrix_shapes(spec)[:9] if c > 1]
    return rank * spec.layers * sum(r + c for r, c in per_layer)


def state_terms(spec: ModelSpec, s: TrainSetup) -> list[Term]:
    """Weights, gradients, master copy and optimiser state (ZeRO-sharded where set)."""
    n, g = spec.n_params, s.gpus
    if s.method != "full":
        return _adapter_terms(spec, s)
    w_div, g_div, o_div = _sharded(s.zero_stage, 3, g), _sharded(s.zero_stage, 2, g), _sharded(s.zero_stage, 1, g)
    wb, gb, mb = weight_bytes(s.precision), grad_bytes(s.precision, s.fp32_grads), master_bytes(s.precision)
    zero = f", ZeRO-{s.zero_stage} over {g}" if s.zero_stage else ""
    weights = f"{wb} B/param ({'fp32' if wb == 4 else 'bf16'}){zero if w_div > 1 else ''}"
    terms = [Term("weights", wb * n / w_div, weights, "states"), _gradient_term(spec, s, gb, g_div=g_div, zero=zero)]
    if mb:
        terms.append(
            Term("master weights", mb * n / o_div, f"fp32 copy in the optimiser{zero if o_div > 1 else ''}", "states")
        )
    terms += _optimizer_terms(spec, s, o_div, zero)
    if s.anchor != "none":
        copies = 2 if s.anchor == "ewc" else 1
        ab = 2 if s.precision == "bf16" else 4  # θ0 in the dtype of the weights the update applies to (fp32 master)
        what = "θ0 copy + diagonal Fisher" if copies == 2 else "frozen θ0 copy"
        how = f"{s.anchor}: {what}, {copies * ab} B/param{zero if o_div > 1 else ''}"
        terms.append(Term("θ0 anchor", copies * ab * n / o_div, how, "states"))
    if s.kl_theta0 and s.kl_live:  # a second, whole module: refused under FSDP2 in this version, so never sharded
        how = f"loss.kl_to_theta0: frozen θ0 model for the KL, {wb} B/param (the weights' dtype)"
        terms.append(Term("θ0 model (KL)", wb * n, how, "states"))
    if s.zero_stage == 3:  # FSDP2, one rank under torchrun included
        terms += _fsdp2_terms(spec, s, wb, gb)
    if s.precision == "bf16-mixed":
        terms.append(_autocast_copies(spec, s))
    return terms


def _gradient_term(spec: ModelSpec, s: TrainSetup, gb: int, *, g_div: float, zero: str) -> Term:
    if s.optimizer_in_backward or s.cpu_offload:
        largest = max(r * c for r, c in _matrix_shapes(spec))
        how = "updated in backward" if s.optimizer_in_backward else "offloaded to the CPU"
        what = f"{how}: one parameter's gradient at a time (largest {largest:,} values, {gb} B each)"
        return Term("gradients", gb * largest, what, "grads")
    return Term("gradients", gb * spec.n_params / g_div, f"{gb} B/param{zero if g_div > 1 else ''}", "grads")


def _optimizer_terms(spec: ModelSpec, s: TrainSetup, o_div: float, zero: str) -> list[Term]:
    n, opt = (
        spec.n_params,
        optimizer_state_bytes(spec, s.optimizer, s.precision, s.rank, project_embeddings=s.project_embeddings),
    )
    if s.cpu_offload:
        where = f"{s.optimizer}: {opt / n:.2f} B/param in CPU memory ({opt / GB:.1f} GB of host RAM), none on the GPU"
        return [Term("optimizer state", 0.0, where, "states")]
    terms = [
        Term(
            "optimizer state", opt / o_div, f"{s.optimizer}: {opt / n:.2f} B/param{zero if o_div > 1 else ''}", "states"
        )
    ]
    if s.optimizer in LOW_BIT:
        largest = max(r * c for r, c in _matrix_shapes(spec))
        per = LOW_BIT_STEP_BYTES[s.optimizer]
        what = (f"{s.optimizer} dequantises one tensor at a time: "
                f"{per} B per value of the largest ({largest:,}); measured on CPU")  # fmt: skip
        if s.optimizer == "adamw4bit" and s.device == "cpu" and largest > LOW_BIT_STEP_SLICE:
            what += f"; stepped in slices of {LOW_BIT_STEP_SLICE:,} values (optim/lowbit_cpu.py)"
            largest = LOW_BIT_STEP_SLICE
        terms.append(Term("optimizer step temporaries", per * largest, what, "step"))
    if s.precision == "bf16" and s.optimizer in ROUNDED_STEP_BYTES:
        largest = max(r * c for r, c in _matrix_shapes(spec))
        per = ROUNDED_STEP_BYTES[s.optimizer]
        what = (f"{s.optimizer} in pure bf16 steps one tensor at a time in fp32, stochastically rounded back: "
                f"{per} B per value of the largest ({largest:,}); measured on CPU")  # fmt: skip
        terms.append(Term("optimizer step temporaries", per * largest, what, "step"))
    return terms


def _autocast_copies(spec: ModelSpec, s: TrainSetup) -> Term:
    """Autocast's bf16 copies of the (gathered) weights are saved for backward: never sharded (the
    same numerics on 1 and G devices: distributed.mixed_precision_policy)."""
    if s.activation_offload:
        what = "autocast's bf16 weight copies are saved tensors too: offloaded, two layers' on the GPU"
        return Term("bf16 weight copies", 2 * 2 * spec.largest_layer_params, what, "transient")
    what = "autocast casts each matmul weight to bf16 and saves it for backward"
    return Term("bf16 weight copies", 2 * spec.n_matmul_params, what, "transient")


def _fsdp2_terms(spec: ModelSpec, s: TrainSetup, wb: int, gb: int) -> list[Term]:
    """ZeRO-3 as FSDP2 does it (fully_shard per decoder layer, then the root). The weights are gathered
    in their own dtype on every device, the gradients reduced in fp32 (distributed.mixed_precision_policy).
    The root unit (embeddings, head, final norm) is used first (embeddings) and last (head, then
    embeddings in backward): it stays gathered through the step, and its gradient is unsharded until
    the end of backward."""
    gathered = wb
    root = spec.n_embed_params * (1 if spec.tied else 2) + spec.hidden
    return [
        Term(
            "gathered layer",
            2 * gathered * spec.largest_layer_params,
            "ZeRO-3: current + prefetched layer unsharded",
            "transient",
        ),
        Term(
            "gathered root unit",
            gathered * root,
            "FSDP2 root unit (embeddings, head, final norm) gathered for the whole step",
            "transient",
        ),
        Term("root unit gradient", gb * root, "the root unit's gradient, unsharded until backward ends", "transient"),
        *(
            [
                Term(
                    "fp32 gradient reduce",
                    4 * root,
                    "pure bf16: the root's gradient reduce-scattered in fp32",
                    "transient",
                )
            ]
            if s.precision == "bf16"
            else []
        ),
    ]


def _adapter_terms(spec: ModelSpec, s: TrainSetup) -> list[Term]:
    adapters = _lora_params(spec, s.lora_rank)
    if s.method == "lora":
        base = Term("weights", 2 * spec.n_params, "frozen bf16 base weights", "states")
    else:
        quantized = spec.n_matmul_params - (spec.vocab * spec.hidden)
        rest = spec.n_params - quantized
        base = Term(
            "weights",
            quantized * (0.5 + 0.127 / 8) + 2 * rest,
            "NF4 4-bit decoder matrices + double-quantised constants (0.127 bit/param); embeddings, head, norms bf16",
            "states",
        )
    return [
        base,
        Term(
            "gradients",
            4 * adapters,
            f"fp32 grads of {adapters:,} adapter params (rank {s.lora_rank}, all linear layers)",
            "grads",
        ),
        Term("optimizer state", 12 * adapters, "fp32 adapter weights + AdamW m, v", "states"),
    ]


def estimate(spec: ModelSpec, s: TrainSetup) -> Estimate:
    """All terms and the peak per GPU: max(start of backward, end of backward / optimiser step)."""
    est = Estimate(spec, s, state_terms(spec, s))
    acts, acts_note = activations(spec, s if s.method == "full" else _bf16(s))
    logits, logits_note = logits_bytes(spec, s)
    est.terms.append(Term("activations", acts, acts_note, "transient"))
    est.terms.append(Term("logits + loss", logits, logits_note, "transient"))
    if s.device == "cuda":
        est.terms.append(
            Term("CUDA context", CUDA_CONTEXT, "CUDA/cuBLAS context, allocator reserve not included", "states")
        )
    states, grads = est.states, est.get("gradients")
    transient = sum(t.bytes for t in est.terms if t.group == "transient")
    # The head's gradient (V×h) appears first in backward, while all activations are still saved.
    head_grad = grad_bytes(s.precision, s.fp32_grads) * spec.vocab * spec.hidden if s.method == "full" else 0
    fsdp_root = est.get("gathered root unit") + est.get("root unit gradient")
    if fsdp_root:
        head_grad = 0  # part of the root unit's gradient, already a term
    # With accumulation, the second and later micro-batches run forward/backward with the
    # accumulated gradients alive (they are freed only after the optimiser step).
    alive = grads if s.grad_accum > 1 else 0.0
    start = states + transient + head_grad / _sharded(s.zero_stage, 2, s.gpus) + alive
    end = states + grads + est.get("gathered layer") + fsdp_root + est.get("optimizer step temporaries")
    when = "start of backward" + (", with the accumulated gradients" if alive else "")
    est.peak, est.peak_when = (start, when) if start >= end else (end, "end of backward")
    return est


def _bf16(s: TrainSetup) -> TrainSetup:
    from dataclasses import replace

    return replace(s, precision="bf16")


def gpus_needed(total_per_gpu_fn, capacity: float, max_gpus: int = 1024) -> int | None:
    """Smallest G with total_per_gpu_fn(G) ≤ capacity (None if none up to max_gpus)."""
    for g in range(1, max_gpus + 1):
        if total_per_gpu_fn(g) <= capacity:
            return g
    return None
