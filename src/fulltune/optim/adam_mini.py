"""`optim.name: adam_mini`: Adam-mini (arXiv 2406.16793), its authors' PyPI package `adam-mini`.

Adam-mini keeps Adam's first moment per weight but one second moment per block instead of per
weight: per token of the embedding and the LM head, per head of the query and key projections, per
output neuron of the value, output and MLP projections, one per norm tensor; biases keep Adam's.
That is ≈ 4 B/param of state in fp32 instead of AdamW's 8. Every weight is still trained.

What fulltune sets around the package (version 1.1.1):
- its blocks come from the parameters' names and the model's shape: `dim` = hidden size, `n_heads`,
  `n_kv_heads` from the config;
- our groups' settings go onto its per-tensor groups: ULMFiT rates, no weight decay on vectors,
  decay toward θ0 (its own rule, by name, would decay what ours does not);
- `world_size` = 1: the package counts the visible GPUs and would all-gather without a process group
  (FSDP2 is refused in this version), and `verbose` off (it prints each tensor);
- the groups' `label` (the name the schedule's logs use) is ours, since its `name` must stay the
  tensor's for its block logic.

Not combined in this version (refused in one line before the model loads): the step in backward,
pure bf16 (no stochastic rounding in its step), CPU offload, FSDP2.
"""

from __future__ import annotations

import torch

from fulltune.errors import UserError

VERSION = "1.1.1"


def _package():
    try:
        from adam_mini import Adam_mini
    except ImportError:
        raise UserError(
            f"optim.name: adam_mini needs its authors' package: pip install 'fulltune[optimizers]' "
            f"(adam-mini=={VERSION}; scripts/setup.sh installs it)"
        ) from None
    return Adam_mini


def adam_mini(model: torch.nn.Module, groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Adam-mini over `groups` (param_groups.param_groups' output), our settings on its groups."""
    c = model.config
    names = {id(p): n for n, p in model.named_parameters()}  # a tied tensor once, under its first name
    named = [(names[id(p)], p) for g in groups for p in g["params"]]
    opt = _package()(
        named,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        dim=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        verbose=False,
    )
    opt.world_size = 1
    ours = {id(p): g for g in groups for p in g["params"]}
    for g in opt.param_groups:
        mine = ours[id(g["params"][0])]
        g.update(
            lr=mine["lr"],
            initial_lr=mine["initial_lr"],
            weight_decay=mine["weight_decay"],
            decay_to_theta0=mine["decay_to_theta0"],
            label=mine["name"],
        )
    assert len(opt.param_groups) == len(ours), "every parameter in exactly one Adam-mini group"
    return opt
