"""torchao's 4-bit AdamW step, written so that inductor's CPU code vectorises it.

torchao's `single_param_adam` compiled for CPU runs as a scalar loop (bench/lowbit_step.py, the
generated C++): the packed codes are read at `index // 2`, each code-map lookup is an int64 gather,
the binary search of the requantisation is four more gathers per value and state, and β^step is
recomputed for every value. On SmolLM2-135M that is ~40 ns a value against 0.8 for fused AdamW.

The same update here keeps torchao's state (OptimState4bit: packed codes, an fp32 scale per block of
128, the code map), so checkpoints, state bytes and resume are unchanged, and computes it with
vector-friendly operations:
  - the even and odd values of each block are two streams (codes >> 4 and codes & 15), never an
    index divided by 2;
  - a code's value is a chain of 16 selects against the map's constants, not a gather;
  - the requantisation counts the map entries at or below the value (15 compares), then rounds
    with torchao's own rule (`x - q[c] >= (q[c+1] - q[c]) * 0.5`, same floats, same codes);
  - β1^step and √(1 − β2^step) are computed once per tensor, outside the kernel.
tests/test_lowbit_cpu.py holds it to torchao's codes and weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _lookup(codes: Tensor, qmap: tuple[float, ...]) -> Tensor:
    """qmap[codes] as a select chain (codes int32, any shape)."""
    out = torch.full_like(codes, qmap[0], dtype=torch.float32)
    for k in range(1, len(qmap)):
        out = torch.where(codes == k, qmap[k], out)
    return out


def quantize(x: Tensor, qmap: tuple[float, ...]) -> Tensor:
    """torchao's quantize_4bit_with_qmap (nearest map entry, ties up), as int32 codes."""
    floor = torch.zeros_like(x, dtype=torch.int32)
    for k in range(1, len(qmap)):
        floor = floor + (x >= qmap[k]).int()
    up = (floor + 1).clamp(max=len(qmap) - 1)
    down_v, up_v = _lookup(floor, qmap), _lookup(up, qmap)
    return torch.where(x - down_v >= (up_v - down_v) * 0.5, up, floor)


def _unpack(codes: Tensor, scale: Tensor, qmap: tuple[float, ...]) -> Tensor:
    """(blocks, half, 2) fp32 values of a packed state: element 2i is the high nibble of byte i."""
    c = codes.view(scale.numel(), -1).int()
    pair = torch.stack([_lookup(c >> 4, qmap), _lookup(c & 15, qmap)], dim=-1)
    return pair * scale.view(-1, 1, 1)


def _pack(x: Tensor, qmap: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(codes, scale) of (blocks, half, 2) values: torchao's scale_tensor, then quantize and pack."""
    scale = x.abs().amax(dim=(1, 2)).clip(1e-12)
    codes = quantize(x / scale.view(-1, 1, 1), qmap)
    return ((codes[..., 0] << 4) | codes[..., 1]).to(torch.uint8).flatten(), scale


def adam4bit_kernel(
    p: Tensor,
    grad: Tensor,
    states: tuple[Tensor, Tensor, Tensor, Tensor],
    scalars: tuple[Tensor, Tensor, Tensor],
    *,
    hyper: tuple[float, float, float, float],
    maps: tuple[tuple[float, ...], tuple[float, ...]],
    rounded: bool,
) -> None:
    """One AdamW step of a 4-bit-state tensor: states (m codes, m scale, v codes, v scale) updated in
    place; scalars (lr, 1 − β1^t, √(1 − β2^t)); hyper (β1, β2, weight decay, eps)."""
    from torchao.optim.quant_utils import _fp32_to_bf16_sr

    m_codes, m_scale, v_codes, v_scale = states
    lr, bias1, bias2_sqrt = scalars
    beta1, beta2, weight_decay, eps = hyper
    shape = (m_scale.numel(), -1, 2)
    p32, g32 = p.float().view(shape), grad.float().view(shape)
    p32 = p32 - lr * weight_decay * p32
    m = _unpack(m_codes, m_scale, maps[0]).lerp(g32, 1 - beta1)
    v = _unpack(v_codes, v_scale, maps[1]).lerp(g32.square(), 1 - beta2)
    for (codes, scale), out in ((_pack(m, maps[0]), (m_codes, m_scale)), (_pack(v, maps[1]), (v_codes, v_scale))):
        out[0].copy_(codes)
        out[1].copy_(scale)
    p32 = p32 - lr * (m / bias1) / ((v.sqrt() / bias2_sqrt) + eps)
    p.copy_((_fp32_to_bf16_sr(p32) if rounded else p32).view(p.shape))


_compiled = None
# Values stepped at once: the kernel's fp32 temporaries are ~20 B a value, so a tensor larger than this
# (a 128k-vocabulary embedding: 262.7M values, 5.25 GB of temporaries at 1B) is stepped in slices of
# whole blocks: at most ~0.67 GB of temporaries. 33.5M values leaves SmolLM2-135M's 28.3M-value embedding
# whole (one compiled graph per shape). A multiple of every block size (torchao's 4-bit block: 128).
STEP_SLICE = 1 << 25


def adam4bit_step(p: Tensor, grad: Tensor, state: dict, group: dict, *, rounded: bool) -> None:
    """torchao's AdamW4bit update of one tensor whose m and v are OptimState4bit, on the CPU, in slices
    of at most STEP_SLICE values (each block's codes and scale stay together)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(adam4bit_kernel, fullgraph=True, dynamic=False)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    step = state["step"]
    n, block = p.numel(), p.numel() // m.scale.numel()
    assert p.is_contiguous() and STEP_SLICE % block == 0 and block % 2 == 0, "whole blocks in every slice"
    flat, g = p.detach().view(-1), grad.reshape(-1)
    for a in range(0, n, STEP_SLICE):
        b, blocks = min(a + STEP_SLICE, n), slice(a // block, min(a + STEP_SLICE, n) // block)
        codes = slice(a // 2, b // 2)
        _compiled(
            flat[a:b],
            g[a:b],
            (m.codes.view(-1)[codes], m.scale.view(-1)[blocks], v.codes.view(-1)[codes], v.scale.view(-1)[blocks]),
            (group["lr"], 1 - beta1**step, (1 - beta2**step).sqrt()),
            hyper=(beta1, beta2, group["weight_decay"], group["eps"]),
            maps=(tuple(m.qmap.tolist()), tuple(v.qmap.tolist())),
            rounded=rounded,
        )


def adamw4bit_class(ao) -> type:
    """torchao's AdamW4bit, with its step loop (state built as torchao builds it), where a CPU tensor
    with 4-bit m and v steps through adam4bit_kernel; every other tensor (small ones keep plain m and
    v; GPU tensors) through torchao's own compiled `single_param_adam`, as in torchao's step."""
    from torchao.optim.adam import single_param_adam
    from torchao.optim.subclass_4bit import OptimState4bit

    class AdamW4bit(ao.AdamW4bit):
        @torch.no_grad()
        def step(self, closure=None):
            assert closure is None, "fulltune never passes a closure"
            with torch._dynamo.utils.disable_cache_limit():  # as torchao: one graph per shape
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            self._step_one(p, group)

        def _step_one(self, p: Tensor, group: dict) -> None:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"], state["exp_avg_sq"] = self._new_buffer(p, True), self._new_buffer(p, False)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = self._new_buffer(p, False)
            state["step"] += 1
            rounded = self.bf16_stochastic_round and p.dtype is torch.bfloat16
            assert self.is_adamw
            if p.device.type == "cpu" and not group["amsgrad"] and type(state["exp_avg"]) is OptimState4bit:
                adam4bit_step(p, p.grad, state, group, rounded=rounded)
                return
            torch.compile(single_param_adam, fullgraph=True, dynamic=False)(
                p.detach(),
                p.grad,
                state["step"],
                state["exp_avg"],
                exp_avg_sq=state["exp_avg_sq"],
                max_exp_avg_sq=state.get("max_exp_avg_sq"),
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                IS_ADAMW=self.is_adamw,
                BF16_STOCHASTIC_ROUND=rounded,
            )

    return AdamW4bit
