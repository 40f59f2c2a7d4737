"""What a step achieved against what the machine can do: useful tokens, padding, FLOP/s and MFU.

Model FLOPs of a training step (forward + backward = 3 × forward, PaLM appendix B convention: no
recomputation counted, attention over the full s × s square of each sequence):

    6 · N_body · T  +  6 · d · V · H  +  12 · L · d_attn · Σ_i s_i²

- T: the step's real (non-padding) tokens; N_body: the matrices outside the embedding and LM head
  (each is multiplied once per token in the forward: 2 FLOPs; the backward computes input and
  weight gradients: 4 more);
- H: the positions where the LM head runs: the target tokens (loss.py projects only those when the
  head is a plain linear map), every token otherwise; d: hidden size, V: vocabulary;
- s_i: the length of each sequence (a packed row's sequences count separately: the mask stops
  them attending to each other); d_attn = heads × head_dim; L: decoder layers. Per layer and
  sequence, QKᵀ and the weighted sum of V are 2·s²·d_attn FLOPs each in the forward.

MFU = model FLOPs / step time / the device's matmul peak, which `matmul_peak` measures at the start
of the run (~1 s) in the run's compute dtype on the shape of the model's MLP projection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fulltune import distributed as D

GB = 1024**3


@dataclass(frozen=True, kw_only=True)
class FlopModel:
    body_params: int  # N_body: every weight matrix except the embedding and the LM head
    hidden: int  # d
    vocab: int  # V
    layers: int  # L
    attn_width: int  # heads × head_dim
    head_on_targets: bool  # the LM head runs on target positions only

    def step_flops(self, lengths: list[int], targets: int) -> float:
        tokens = sum(lengths)
        head_rows = targets if self.head_on_targets else tokens
        return (
            6.0 * self.body_params * tokens
            + 6.0 * self.hidden * self.vocab * head_rows
            + 12.0 * self.layers * self.attn_width * sum(s * s for s in lengths)
        )


def flop_model(model) -> FlopModel:
    from fulltune.loss import plain_head

    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    skip = {id(embed), id(head)}
    body = sum(
        p.numel() for p in model.parameters() if id(p) not in skip and p.ndim >= 2
    )  # matmul weights (norms: no matmul)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return FlopModel(
        body_params=body,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        layers=cfg.num_hidden_layers,
        attn_width=heads * head_dim,
        head_on_targets=plain_head(model),
    )


def sequence_lengths(examples) -> list[int]:
    """Each sequence's length, packed rows split into their sequences."""
    return [n for e in examples for n in (e.lengths or (len(e.input_ids),))]


def compute_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def matmul_peak(
    device: torch.device, dtype: torch.dtype, *, rows: int, hidden: int, inner: int, seconds: float = 1.0
) -> float:
    """FLOP/s of the best timed (rows × hidden) @ (hidden × inner) matmul, repeated for ~`seconds`."""
    g = torch.Generator(device).manual_seed(0)  # its own generator: the run's RNG stream is not touched
    a = torch.randn(rows, hidden, device=device, dtype=dtype, generator=g)
    b = torch.randn(hidden, inner, device=device, dtype=dtype, generator=g)
    timed = _cuda_seconds_per_matmul if device.type == "cuda" else _host_seconds_per_matmul
    a @ b  # warm-up: kernel choice, page faults
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        best = min(best, timed(a, b))
    return 2.0 * rows * hidden * inner / best


def _host_seconds_per_matmul(a: torch.Tensor, b: torch.Tensor, reps: int = 4) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return (time.perf_counter() - t0) / reps


def _cuda_seconds_per_matmul(a: torch.Tensor, b: torch.Tensor, reps: int = 64) -> float:
    """The GPU's own time for one matmul: CUDA events around `reps` matmuls queued behind a spin
    kernel, so the host's launches (slower than a small matmul) are not in the time, nor a host sync
    every few matmuls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ~20-50 ms of GPU spin while the host queues the matmuls
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _status_gb(key: str) -> float:
    """A /proc/self/status memory line (VmHWM, VmRSS) in GB; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak so far: CUDA max_memory_allocated, or the resident set's high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return _status_gb("VmHWM")


def memory_gb(device: torch.device) -> float:
    """What the process holds now, between steps: CUDA memory_allocated, or the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GB
    return _status_gb("VmRSS")


def run_peak(cfg, model, precision: str, device: torch.device) -> float:
    """The matmul peak of every rank together, measured on the model's MLP shape in the compute dtype."""
    if cfg.train.peak_probe_s <= 0:
        return 0.0
    dtype = compute_dtype(precision)
    rows = min(cfg.train.micro_batch_size * cfg.data.max_seq_len, 4096)
    hidden, inner = model.config.hidden_size, getattr(model.config, "intermediate_size", 4 * model.config.hidden_size)
    peak = D.all_sum(
        [matmul_peak(device, dtype, rows=rows, hidden=hidden, inner=inner, seconds=cfg.train.peak_probe_s)]
    )[0]
    print(
        f"[train] matmul peak {peak / 1e12:.3f} TFLOP/s ({str(dtype).removeprefix('torch.')}, {rows}×{hidden} @ "
        f"{hidden}×{inner}{f', {D.world_size()} ranks' if D.sharded() else ''}): the denominator of MFU",
        flush=True,
    )
    return peak


def targets(examples) -> int:
    """Target (loss) tokens of the examples: every masked-in position after the first token."""
    return sum(sum(e.target_mask[1:]) for e in examples)


def step_record(run, result, *, flat: list[int], batches: list[dict], seconds: float) -> dict:
    """The metrics.jsonl record of the step just taken and counted (run.state.step), throughput
    included. `flat`: the step's sequences over every rank; `batches`: this rank's micro-batches."""
    from fulltune.data.mixture import MixedSampler
    from fulltune.optim.param_groups import lrs_by_name

    s, every = run.state, run.examples(flat)
    tokens, n_targets = sum(len(e.input_ids) for e in every), targets(every)
    (padded,) = D.all_sum([sum(b["input_ids"].numel() for b in batches)])  # null micro-batches count too
    flops = run.flops.step_flops(sequence_lengths(every), n_targets)
    rec = {
        "step": s.step, "epoch": run.sampler.epoch, "loss": result.loss, "lr": lrs_by_name(run.optimizer),
        "grad_norm": result.grad_norm, "tokens_seen": s.tokens_seen, "target_tokens_seen": s.target_tokens_seen,
        "tokens_per_s": tokens / seconds, "elapsed_s": s.elapsed_s, "padding_fraction": 1 - tokens / padded,
        "flops_per_s": flops / seconds, "memory_gb": memory_gb(run.device),
        "peak_memory_gb": peak_memory_gb(run.device),
    }  # fmt: skip
    if run.peak_flops:
        rec["mfu"] = flops / seconds / run.peak_flops
    if isinstance(run.sampler, MixedSampler):
        general = run.examples([i for i in flat if i >= len(run.data.train)])
        s.general_target_tokens = (s.general_target_tokens or 0) + targets(general)
    if result.dft_loss is not None:
        rec["dft_loss"] = result.dft_loss  # loss.type dft: what was minimised ("loss" stays the token CE)
    if result.kl is not None:
        rec["kl_to_theta0"] = result.kl  # mean KL(p_θ0 ‖ p_θ) per target token, before the update
    if not result.applied:
        rec["skipped"] = True  # the update was not applied (health.py)
    if run.anchor is not None:
        rec["theta0_distance"] = run.anchor.distance()  # after the update
        if run.anchor.lam:
            rec["penalty"] = run.anchor.last_penalty
    return rec
