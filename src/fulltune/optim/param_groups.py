"""Parameter groups: no weight decay on biases and norm weights; ULMFiT discriminative rates.

With `layer_lr_decay` ξ, decoder layer l counted from the top (l = 0 for the last layer) gets
lr·ξ^-l; the embeddings sit one below the bottom layer (the lowest rate, lr·ξ^-L); the final norm
and an untied LM head get the top rate. A tied embedding/LM-head tensor is one parameter and can
sit in one group only: it takes the embedding's (lowest, most conservative) rate.
"""

from __future__ import annotations

from torch import nn

from fulltune.config import OptimConfig
from fulltune.model import decoder_layers
from fulltune.optim.adam_mini import adam_mini
from fulltune.optim.in_backward import InBackward
from fulltune.optim.muon import MATRIX_OPTIMIZERS, is_hidden_matrix
from fulltune.optim.optimizers import make_optimizer
from fulltune.optim.projected import check_rank, settings


def depth_from_top(model: nn.Module) -> dict[int, tuple[int, str]]:
    """id(param) → (l, group label): l = 0 for the top layer, head and final norm."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    depth: dict[int, tuple[int, str]] = {}
    for p in model.get_input_embeddings().parameters():
        depth[id(p)] = (n_layers, "embed")
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            depth.setdefault(id(p), (n_layers - 1 - i, f"layer.{i}"))
    for p in model.parameters():
        depth.setdefault(id(p), (0, "head"))  # final norm, untied LM head
    return depth


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay only on matrices: never on biases or norm weights (1-D tensors)."""
    return p.ndim >= 2


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The optimiser's groups: by layer (ULMFiT rates), by weight decay and, for the optimisers that
    treat the decoder's matrices apart (Muon, GaLore, APOLLO), by `hidden_matrix` (optim/muon.py)."""
    depth = depth_from_top(model) if cfg.layer_lr_decay != 1.0 else {}
    apart = cfg.name in MATRIX_OPTIMIZERS
    in_decoder = {id(p) for layer in decoder_layers(model) for p in layer.parameters()} if apart else set()
    groups: dict[tuple[str, bool, bool], dict] = {}
    for name, p in model.named_parameters():  # a tied tensor is listed once
        level, label = depth.get(id(p), (0, "all"))
        lr = cfg.lr * cfg.layer_lr_decay ** (-level)
        decay = _decays(name, p) and cfg.weight_decay > 0
        hidden = is_hidden_matrix(p, id(p) in in_decoder) or (cfg.project_embeddings and p.ndim == 2)
        key = (label, decay, hidden)
        if key not in groups:
            wd = cfg.weight_decay if decay else 0.0
            toward_theta0 = cfg.decay_toward == "theta0"  # the loop's Anchor applies it: θ ← θ − lr·wd·(θ − θ0)
            groups[key] = {
                "name": label,
                "params": [],
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": 0.0 if toward_theta0 else wd,
                "decay_to_theta0": wd if toward_theta0 else 0.0,
                "hidden_matrix": hidden,
            }
        groups[key]["params"].append(p)
    out = list(groups.values())
    # Invariant: every trainable parameter in exactly one group.
    seen = [id(p) for g in out for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters())), "a parameter is in 0 or 2 groups"
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, precision: str = "fp32", in_backward: bool = False):
    """The configured optimiser over this model's groups; with `in_backward`, one per parameter, stepped
    inside the backward pass (optim/in_backward.py)."""
    groups = param_groups(model, cfg)
    if cfg.name == "adam_mini":  # its blocks need the tensors' names (config_checks refuses in_backward)
        return adam_mini(model, groups, cfg)
    if cfg.name in ("galore", "apollo", "apollo_mini"):  # a rank above a matrix's side: one line, naming the key
        check_rank(groups, settings(cfg)["rank"], {id(p): n for n, p in model.named_parameters()})
    if in_backward:
        return InBackward(model, groups, lambda one: make_optimizer(one, cfg, precision), clip=cfg.grad_clip)
    return make_optimizer(groups, cfg, precision)


def lrs_by_name(optimizer) -> dict[str, float]:
    """Current lr per group label (decay/no-decay halves share a label and a rate; Adam-mini's
    per-tensor groups carry ours as `label`)."""
    return {g.get("label", g["name"]): float(g["lr"]) for g in optimizer.param_groups}
