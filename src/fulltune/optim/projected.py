"""`optim.name: galore | apollo | apollo_mini`: AdamW on projected gradients, from the APOLLO
authors' package `apollo-torch` (which also ships GaLore's optimiser).

Every weight is still updated. For each of the decoder's 2-D matrices the gradient is projected to
`optim.rank` dimensions along its longer side, Adam's m and v live there, and the update goes back
to the full matrix; the projection is renewed every `optim.update_proj_gap` steps. Embeddings, the
LM head, norms and biases take the package's plain AdamW path.

- galore (arXiv 2403.03507): the projection from the gradient's SVD, the low-rank update projected
  back and scaled by `scale` (default 2, LLaMA-Factory's).
- apollo (arXiv 2412.05270): a random projection (seeded, so it needs no SVD and no storage beyond
  the matrix); the low-rank Adam update only measures how much to scale each channel of the raw
  gradient (`scale` default 32 and rank 16, LLaMA-Factory's).
- apollo_mini: rank 1 and one scale per tensor (`scale` default 128, the paper's).

State per matrix of sides m ≥ n: m·r values each for m and v, and the projection's r·n (4 B each
in fp32): memory/estimate.py counts them. The package keeps each projection in a Python object;
`ProjectedAdamW` saves its tensors and numbers instead (checkpoints load with weights_only=True)
and rebuilds it on resume, so a resumed run projects exactly as the straight one did.

Pure bf16: each tensor's step in fp32 around the package's, stochastically rounded back
(optim/rounding.py). Not combined in this version: CPU offload, FSDP2 (refused in one line). A rank
above a matrix's shorter side is refused naming `optim.rank`.
"""

from __future__ import annotations

import torch

from fulltune.errors import UserError

VERSION = "1.0.3"
SCALE = {"galore": 2.0, "apollo": 32.0, "apollo_mini": 128.0}
_KEPT = ("ortho_matrix", "seed", "svd_count")  # what a projector holds besides its group's settings


def _package():
    try:
        import apollo_torch
    except ImportError:
        raise UserError(
            f"optim.name: galore and apollo need the APOLLO authors' package: pip install 'fulltune[optimizers]' "
            f"(apollo-torch=={VERSION} with bitsandbytes; scripts/setup.sh installs it)"
        ) from None
    return apollo_torch


def settings(cfg) -> dict:
    """The group keys the package reads for a projected matrix."""
    rank = 1 if cfg.name == "apollo_mini" else cfg.rank
    low = {"rank": rank, "update_proj_gap": cfg.update_proj_gap, "scale": cfg.proj_scale or SCALE[cfg.name]}
    low["proj_type"] = "std"  # along the longer side
    if cfg.name != "galore":
        low.update(proj="random", scale_type="tensor" if cfg.name == "apollo_mini" else "channel")
    return low


def check_rank(groups: list[dict], rank: int, names: dict[int, str]) -> None:
    """A rank above the shortest side of any projected matrix: one line naming the key and that matrix."""
    matrices = [p for g in groups if g.get("hidden_matrix") for p in g["params"]]
    p = min(matrices, key=lambda m: min(m.shape), default=None)
    if p is not None and rank > min(p.shape):
        raise UserError(
            f"optim.rank: {rank} is larger than the shorter side of {names.get(id(p), 'a matrix')} "
            f"({p.shape[0]} × {p.shape[1]}); use at most {min(p.shape)}"
        )


def projected(groups: list[dict], cfg) -> ProjectedAdamW:
    pkg = _package()
    cls = pkg.GaLoreAdamW if cfg.name == "galore" else pkg.APOLLOAdamW
    low = settings(cfg)
    groups = [{**g, **low} if g.get("hidden_matrix") else dict(g) for g in groups]
    return ProjectedAdamW(cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps), galore=cfg.name == "galore")


class ProjectedAdamW:
    def __init__(self, inner: torch.optim.Optimizer, galore: bool):
        self.inner, self.galore = inner, galore

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        """Each tensor's state, its projection's matrix beside m and v (what measure.state_bytes counts)."""
        out = {}
        for p, s in self.inner.state.items():
            kept = _saved(s)
            out[p] = {**{n: v for n, v in kept.items() if n != "projector"}, **kept.get("projector", {})}
        return out

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        return {"projected": {**sd, "state": {k: _saved(s) for k, s in sd["state"].items()}}}

    def load_state_dict(self, state: dict) -> None:
        """torch's loader casts every state tensor to its parameter's dtype; the projection and APOLLO's
        0-d norm of the last update (`scaled_grad`, fp32 beside a bf16 weight) are put back as saved."""
        sd = state["projected"]
        aside = {k: {n: v for n, v in s.items() if _as_saved(n, v)} for k, s in sd["state"].items()}
        plain = {k: {n: v for n, v in s.items() if not _as_saved(n, v)} for k, s in sd["state"].items()}
        self.inner.load_state_dict({**sd, "state": plain})
        params = [(p, g) for g in self.inner.param_groups for p in g["params"]]
        for k, saved in aside.items():
            p, group = params[int(k)]
            for name, value in saved.items():
                if name == "projector":
                    value = self._projector(group, p, value)
                self.inner.state[p][name] = value.to(p.device) if torch.is_tensor(value) else value

    def _projector(self, group: dict, p: torch.Tensor, saved: dict):
        """The package's projector for `p`, as saved (its matrix on the parameter's device)."""
        if self.galore:
            from apollo_torch.svd_projector import GaLoreProjector

            proj = GaLoreProjector(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"],
            )  # fmt: skip
        else:
            proj = self.inner._initialize_projector(group, self.inner.state[p])
        for name, value in saved.items():
            setattr(proj, name, value.to(p.device) if torch.is_tensor(value) else value)
        return proj


def _as_saved(name: str, value) -> bool:
    return name == "projector" or (torch.is_tensor(value) and value.ndim == 0)


def _saved(state: dict) -> dict:
    """A tensor's state with its projector as a dict of tensors and numbers."""
    if "projector" not in state:
        return state
    proj = state["projector"]
    kept = {n: getattr(proj, n) for n in _KEPT if getattr(proj, n, None) is not None}
    return {**state, "projector": kept}
