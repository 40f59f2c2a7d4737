"""Device and precision: where the run happens, whether bf16 pays off there, and the lean preset.

One vocabulary for precision, in the config, the estimator, the planner and the logs:
    fp32        fp32 weights, gradients and optimiser state
    bf16-mixed  fp32 weights (the master copy), bf16 autocast of the forward's matmuls
    bf16        pure bf16 weights and gradients, no fp32 copy; updates stochastically rounded
The estimator also knows bf16-master (bf16 weights + an fp32 master copy in the optimiser: the 16N
layout of ZeRO/DeepSpeed), for comparison only: fulltune does not train it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from fulltune.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool, device: torch.device):
    """CUDA: fp32 matmuls in TF32 (fp32 range, 10-bit mantissa products, fp32 sums; about 8× an IEEE
    fp32 matmul on Ampere and later) while the run lasts, where `train.tf32` asks; the caller's setting
    back afterwards. Through torch's one process-wide switch; on CPU nothing changes."""
    if device.type != "cuda":
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# oneDNN instruction-set caps below AVX512_CORE_BF16: with one of these in ONEDNN_MAX_CPU_ISA the matmul
# kernels use no bf16 units whatever the CPU has (measured with AVX2: bf16 2 GFLOP/s against 230 in fp32).
ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16_units() -> bool:
    """AMX-bf16 or AVX512-bf16, and oneDNN allowed to use them: where bf16 matmuls beat fp32 (elsewhere
    they run slower)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_CAPS_WITHOUT_BF16:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def has_bf16_units(device_type: str) -> bool:
    if device_type == "cuda":  # emulated bf16 (V100, T4: compute capability < 8.0) does not count
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_bf16_units()


SLOW_BF16_GPU = "this GPU has no bf16 units (compute capability below 8.0, e.g. V100, T4): torch emulates bf16"
SLOW_BF16 = (
    "this CPU has no bf16 units (no AMX-bf16 or AVX512-bf16 in /proc/cpuinfo, or ONEDNN_MAX_CPU_ISA "
    "caps them off): bf16 matmuls run in "
    "software there, ~100× slower than fp32 (measured on an AVX2-only EPYC: 0.9 vs ~100 GFLOP/s)"
)


def resolve_precision(precision: str, device: torch.device, force: bool = False) -> str:
    """`auto` → bf16-mixed where the hardware has bf16 units, else fp32 (never pure bf16). Pure bf16
    on a CPU without bf16 units is refused unless forced; bf16-mixed there gets a warning."""
    units = has_bf16_units(device.type)
    if precision == "auto":
        return "bf16-mixed" if units else "fp32"
    if precision.startswith("bf16") and not units:
        why = SLOW_BF16 if device.type == "cpu" else SLOW_BF16_GPU
        if precision == "bf16" and not force:
            raise UserError(f"train.precision: bf16 refused: {why}; use fp32, or set train.force_precision=true")
        print(f"[train] warning: train.precision {precision}: {why}", flush=True)
    return precision


def check_device_settings(cfg, device: torch.device) -> None:
    """The CUDA-only settings, refused on a CPU run before any model loads."""
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util

        if device.type != "cuda":
            raise UserError("model.attn_implementation: flash_attention_2 runs on CUDA only; use sdpa on the CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn), or use sdpa"
            )
    if device.type == "cuda":
        return
    for key, on in (
        ("model.activation_offload", cfg.model.activation_offload),
        ("optim.cpu_offload", cfg.optim.cpu_offload),
    ):
        if on:
            raise UserError(f"{key}: offloads GPU memory to the CPU; this run is on the CPU already (set it to false)")


def lean_settings(raw: dict) -> dict[str, object]:
    """What train.memory=lean sets on this machine (`raw`: the config's sections as read): the lowest
    model state fulltune trains, measured in docs/memory.md — bf16 weights where the device has bf16
    units (else fp32), 4-bit AdamW, the step in backward with its gradients freed at once (when there is
    no accumulation), and activation checkpointing. The config's clipping stays: in backward it costs a
    second forward and backward a step, and without it lean lost the task's validation loss (0.047
    against the default's 0.021 on subjects; 0.023 with it: docs/memory.md "Lean's factor study")."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    name = train.get("device", "auto")  # an invalid name is reported by the config check afterwards
    device_type = "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"
    settings: dict[str, object] = {
        "train.precision": "bf16" if has_bf16_units(device_type) else "fp32",
        "optim.name": "adamw4bit",
        "model.activation_checkpointing": True,
    }
    if train.get("grad_accum_steps", 1) == 1:
        settings["train.optimizer_in_backward"] = True
    return settings


def floor_settings(raw: dict) -> dict[str, object]:
    """What train.memory=floor sets: lean's weights, checkpointing and step in backward, with
    APOLLO-Mini (a rank-1 projection, one scale per tensor) on every matrix, the embedding and LM head
    included, so the optimiser state is a few values per matrix row: ~2 B/param of model state in
    bf16 (docs/memory.md)."""
    settings = lean_settings(raw)
    settings.update({"optim.name": "apollo_mini", "optim.project_embeddings": True})
    return settings


def autocast_factory(precision: str, device: torch.device, offload_activations: bool = False):
    """A zero-argument callable returning the forward pass's context.

    bf16-mixed: weights, gradients and optimiser state stay fp32; only matmuls run in bf16. fp32 and
    pure bf16 need no autocast: the weights are already in the dtype the matmuls run in.
    `offload_activations` (CUDA): every tensor saved for backward but the weights goes to pinned CPU
    memory as it is saved and comes back when backward needs it (`offload_saved_tensors`).
    """
    cast = contextlib.nullcontext
    if precision == "bf16-mixed":
        cast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    if not offload_activations:
        return cast

    @contextlib.contextmanager
    def cast_and_offload():
        with cast(), offload_saved_tensors(pin_memory=True):
            yield

    return cast_and_offload


def offload_saved_tensors(pin_memory: bool, record: list | None = None):
    """torch.autograd.graph.save_on_cpu, but a parameter is saved as it is: the model holds it anyway
    (under FSDP2, the gathered weights are parameters too), so copying it out and back each micro-batch
    would only move the weights twice. Autocast's bf16 weight copies are new tensors, and go.
    `record` (tests): (offloaded?, tensor) for each saved tensor."""

    def pack(t: torch.Tensor):
        keep = isinstance(t, torch.nn.Parameter)
        if record is not None:
            record.append((not keep, t))
        if keep:
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin_memory and t.is_cuda)
        host.copy_(t)
        return t.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=pin_memory)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def machine_line() -> str:
    """What this machine is, as the CI log and benchmark tables name it: the CPU model, its bf16/AVX
    flags, the ISA inductor generates code for, and what `precision: auto` picks here."""
    from fulltune.model import inductor_cpu_isa

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU"
    )
    present = set(info.split())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in present]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (
        f"[machine] {model}, {os.cpu_count()} cores; flags {' '.join(flags) or 'none of avx2/avx512/amx'}"
        f"{f' (ONEDNN_MAX_CPU_ISA={cap})' if cap else ''}; inductor ISA {inductor_cpu_isa()}; "
        f"precision auto → {resolve_precision('auto', torch.device('cpu'))}; torch {torch.__version__}"
    )


if __name__ == "__main__":  # python -m fulltune.runtime: the line scripts/test.sh prints before the tests
    print(machine_line())
