"""`optim.name: muon`: torch.optim.Muon for the decoder's hidden matrices, AdamW for the rest.

Muon (Keller Jordan et al. 2024; torch.optim.Muon since torch 2.9) replaces each 2-D hidden weight's
update by its momentum orthogonalised with Newton–Schulz iterations (run in bf16 by torch's
implementation). Its documentation says it is for hidden weight layers only: embeddings, the LM head,
norm weights and biases stay with AdamW. Every weight is still trained.

- Learning rate and weight decay: AdamW's, for both parts. Muon's update is scaled per matrix as
  Moonshot's `match_rms_adamw` (0.2·√max(A, B)), which "Muon is Scalable for LLM Training" (arXiv
  2502.16982) introduced so that AdamW's lr and weight decay carry over.
- State: one momentum buffer per hidden matrix (the parameter's dtype: 4 B/param in fp32), AdamW's
  m and v for the rest (8 B/param): memory/estimate.py counts both.
- Pure bf16: each tensor's step in fp32, stochastically rounded back (optim/rounding.py).
- Not combined, in this version: FSDP2 (Newton–Schulz needs the whole matrix, a rank holds a
  shard), CPU offload (torchao's wrapper takes one optimiser class): refused in one line.

`MuonAdamW` stands in for one optimiser as `InBackward` does: `param_groups` (both parts' groups,
so the schedule sets every rate), `state`, `state_dict` per part (exact resume), `step`, `zero_grad`.
With the step in backward, each parameter gets its own `MuonAdamW` holding one of the two.
"""

from __future__ import annotations

import torch

MOMENTUM = 0.95  # torch's default and the paper's
MATRIX_OPTIMIZERS = ("muon", "galore", "apollo", "apollo_mini")  # the decoder's matrices apart from the rest
ADJUST_LR = "match_rms_adamw"


def is_hidden_matrix(p: torch.Tensor, in_decoder: bool) -> bool:
    """What Muon steps: a 2-D weight inside a decoder layer (not an embedding, the head or a vector)."""
    return in_decoder and p.ndim == 2


class MuonAdamW:
    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float):
        muon = [g for g in groups if g.get("hidden_matrix")]
        adamw = [g for g in groups if not g.get("hidden_matrix")]
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if muon:
            self.parts["muon"] = torch.optim.Muon(muon, lr=lr, momentum=MOMENTUM, adjust_lr_fn=ADJUST_LR)
        if adamw:
            self.parts["adamw"] = torch.optim.AdamW(adamw, lr=lr, betas=betas, eps=eps, fused=True)
        assert self.parts, "an optimiser over no parameters"

    @property
    def param_groups(self) -> list[dict]:
        """Read anew each time: load_state_dict replaces each part's group dicts."""
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.parts.values() for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon_adamw": {name: opt.state_dict() for name, opt in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["muon_adamw"]
        if set(saved) != set(self.parts):
            raise ValueError("the checkpoint's Muon / AdamW parts do not match this model's parameters")
        for name, opt in self.parts.items():
            opt.load_state_dict(saved[name])
