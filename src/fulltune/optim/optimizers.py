"""The optimisers fulltune trains with, chosen by `optim.name`, and how a learning rate is set.

    adamw      torch AdamW (fused), fp32 m and v: 8 B/param; in pure bf16, torchao's _AdamW with
               stochastic rounding and bf16 m and v: 4 B/param
    adamw8bit  torchao AdamW8bit: m and v as uint8 codes + an fp32 scale per 256 values (tensors of
               at least 4096 values; smaller ones keep m and v in the weights' dtype)
    adamw4bit  torchao AdamW4bit: 4-bit codes + an fp32 scale per 128 values (on CPU its update
               runs through optim/lowbit_cpu.py's vectorised kernel: same state, same codes)
    adafactor  torch Adafactor: a factored second moment, (rows + cols) values per matrix, no first
               moment; its lr is a relative step (scaled by each tensor's RMS), not AdamW's
    sgd        torch SGD (optim.momentum: one buffer, 4 B/param in fp32)
    muon       torch Muon for the decoder's 2-D matrices (one momentum buffer, 4 B/param in fp32),
               fused AdamW for embeddings, head, norms and biases (optim/muon.py)

In `train.precision: bf16` the weights are bf16 with no fp32 copy, and every update is rounded
stochastically (E[round(x)] = x), so updates below bf16's resolution still move the weights on
average: torchao's AdamW variants inside their step, SGD, Adafactor, Muon, GaLore and APOLLO by optim/rounding.py
around theirs (each tensor's step in fp32, written back with stochastic rounding).
"""

from __future__ import annotations

import torch

from fulltune.config import OptimConfig
from fulltune.errors import UserError
from fulltune.optim.lowbit_cpu import adamw4bit_class
from fulltune.optim.muon import MuonAdamW
from fulltune.optim.projected import projected
from fulltune.optim.rounding import StochasticRounding

TORCHAO_VERSION = "0.18.0"
# pure bf16: optim/rounding.py (torchao's AdamW variants round inside their step)
ROUNDED_AROUND = ("sgd", "adafactor", "muon", "galore", "apollo", "apollo_mini")


def torchao_optim():
    """torchao.optim, or one line saying what to install (fulltune/__init__ quiets its CPU load notices)."""
    try:
        import torchao.optim as ao
    except Exception as exc:  # ImportError, or a torchao built against another torch
        raise UserError(
            f"optim.name needs torchao for the 8-bit / 4-bit / bf16 AdamW: pip install "
            f"torchao=={TORCHAO_VERSION} (scripts/setup.sh installs it); import failed: {exc}"
        ) from None
    return ao


def optimizer_class(cfg: OptimConfig, precision: str) -> tuple[type, dict]:
    """(class, keyword arguments besides the parameter groups) of the configured optimiser."""
    bf16 = precision == "bf16"
    if cfg.name == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum}
    if cfg.name == "adafactor":
        return torch.optim.Adafactor, {"lr": cfg.lr}
    adam = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.name == "adamw" and not bf16:
        # fused AdamW runs on CPU too: ~3× faster than the foreach path on 135M parameters.
        return torch.optim.AdamW, {**adam, "fused": True}
    ao = torchao_optim()
    if cfg.name == "adamw4bit":  # torchao's update, its CPU kernel vectorised (optim/lowbit_cpu.py)
        return adamw4bit_class(ao), {**adam, "bf16_stochastic_round": bf16}
    cls = {"adamw": ao._AdamW, "adamw8bit": ao.AdamW8bit}[cfg.name]
    return cls, {**adam, "bf16_stochastic_round": bf16}


def make_optimizer(groups: list[dict], cfg: OptimConfig, precision: str) -> torch.optim.Optimizer:
    """The configured optimiser over parameter groups (param_groups.param_groups' output). With
    optim.cpu_offload (CUDA), torchao's CPUOffloadOptimizer keeps its state on the CPU and steps it there."""
    if precision == "bf16" and cfg.name in ROUNDED_AROUND:  # per tensor in fp32, stochastically rounded back
        return StochasticRounding(groups, lambda one: make_optimizer(one, cfg, "fp32"))
    if cfg.name in ("galore", "apollo", "apollo_mini"):  # refused with CPU offload and FSDP2
        return projected(groups, cfg)
    if cfg.name == "muon":  # config_checks refuses it under FSDP2 and with CPU offload
        return MuonAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    cls, kwargs = optimizer_class(cfg, precision)
    if cfg.cpu_offload:
        return torchao_optim().CPUOffloadOptimizer(groups, cls, offload_gradients=True, **kwargs)
    return cls(groups, **kwargs)


def weights_loaded(optimizer) -> None:
    """After a checkpoint's weights load: torchao's CPU offload keeps its own CPU copy of each offloaded
    weight, taken when it was built (θ0), and writes it back to the GPU after every step; copy the loaded
    weights into it, or the resumed run would silently continue from θ0."""
    with torch.no_grad():
        for p_device, p_host in getattr(optimizer, "param_d2h_map", {}).items():
            p_host.copy_(p_device.detach())


def device_states(optimizer) -> list[dict]:
    """The optimiser's per-tensor states held on the training device. torchao's CPU offload has no
    `state` of its own: the offloaded tensors' states are its CPU optimisers' (`optim_dict`), and only
    its on-device optimiser for the small tensors (`d_opt`) holds state on the GPU."""
    if hasattr(optimizer, "optim_dict"):
        return list(optimizer.d_opt.state.values()) if optimizer.d_opt is not None else []
    return list(optimizer.state.values())


def set_lr(group: dict, value: float) -> None:
    """torchao keeps lr as a tensor (a new float each step would recompile its step): fill it in place."""
    if torch.is_tensor(group["lr"]):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def state_tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor really holds: a torchao quantised state is its codes, scales and code map."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(state_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
