"""Stochastic rounding for every optimiser in pure bf16 (`train.precision: bf16`).

With bf16 weights and no fp32 copy, an update smaller than half the weight's bf16 spacing (2^-8 of
its magnitude) rounds to nothing, so small learning rates train nothing. torchao's AdamW variants
round stochastically inside their own step; for SGD, Adafactor, Muon, GaLore and APOLLO this module does it around
theirs, one mechanism for all:

- each parameter gets its own optimiser (the class and settings of the configured one), so the
  update is computed for one tensor at a time;
- before that tensor's step, its weight, gradient and state are copied to fp32; the optimiser steps
  the fp32 copy; the weight is written back into its bf16 storage with stochastic rounding
  (E[round(x)] = x: add 16 random bits below bf16's mantissa, then truncate), the state back in
  bf16 (round to nearest; states are kept in the weights' dtype, as the estimator counts them);
- the random bits come from torch's default generator (seeded by train.seed, saved in every
  checkpoint and restored on resume), so a resumed run rounds exactly as the straight one did.

The fp32 copies live for one tensor at a time: (weight + gradient + noise + states) × 4 B of the
largest tensor, the rounding done in place (memory/estimate.py's "optimizer step temporaries",
measured by bench/rounded_step_memory.py).

`StochasticRounding` stands in for one optimiser as `InBackward` does (`param_groups`, `state`,
`state_dict` keyed by position, `step`, `zero_grad`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LOW = -65536  # 0xFFFF0000 as int32: keeps sign, exponent and bf16's 7 mantissa bits


def round_to_bf16_(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 with stochastic rounding: unbiased, from torch's default generator (of x's device).
    In place: `x` is spent (its bits rounded), only the int32 noise is made beside it."""
    assert x.dtype == torch.float32 and x.is_contiguous()
    bits = x.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device))
    bits.bitwise_and_(_LOW)
    return x.to(torch.bfloat16)


class StochasticRounding:
    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.optimizers = [make([{**g, "params": [p]}]) for g in groups for p in g["params"]]

    @property
    def param_groups(self) -> list[dict]:
        """Read anew each time: load_state_dict replaces each optimiser's group dicts."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            p = opt.param_groups[0]["params"][0]
            if p.grad is None:
                continue
            if p.dtype != torch.bfloat16:  # nothing rounds away in fp32
                opt.step()
                continue
            _step_in_fp32(opt, p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"stochastic_rounding": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["stochastic_rounding"]
        if len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's per-tensor optimisers do not match this model's parameters")
        for opt, one in zip(self.optimizers, saved):
            opt.load_state_dict(one)


def _step_in_fp32(opt: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """One bf16 tensor's step computed in fp32, written back with stochastic rounding."""
    weight, grad = p.data, p.grad
    states = [o.state[p] for o in _torch_optimizers(opt)]
    for state in states:  # the state in fp32 for the step (a step counter stays as it is)
        state.update({k: v.float() for k, v in state.items() if _is_state_tensor(v)})
    p.data, p.grad = weight.float(), grad.float()
    try:
        opt.step()
        weight.copy_(round_to_bf16_(p.data))
    finally:
        p.data, p.grad = weight, grad
    for state in states:
        state.update({k: v.to(torch.bfloat16) for k, v in state.items() if _is_state_tensor(v)})


def _torch_optimizers(opt) -> list[torch.optim.Optimizer]:
    """The torch optimisers holding the state: MuonAdamW's parts, ProjectedAdamW's package optimiser."""
    if hasattr(opt, "parts"):
        return list(opt.parts.values())
    return [getattr(opt, "inner", opt)]


def _is_state_tensor(v) -> bool:
    return torch.is_tensor(v) and v.is_floating_point() and v.ndim > 0
