"""Device and precision: where the run happens and whether bf16 autocast pays off there."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from fulltune.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_bf16_units() -> bool:
    """AMX-bf16 or AVX512-bf16: where bf16 matmuls beat fp32 (elsewhere they run slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16-mixed" if cpu_has_bf16_units() else "fp32"


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument callable returning the forward pass's autocast context.

    Master weights, gradients and optimiser state stay fp32; only matmuls run in bf16.
    """
    if precision == "bf16-mixed":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
