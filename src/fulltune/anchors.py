"""Pulls toward θ0: the L2-SP and EWC penalties, weight decay toward θ0, and EWC's Fisher.

    L2-SP:  loss + λ/2 · Σ (θ − θ0)²        its gradient λ·(θ − θ0)
    EWC:    loss + λ/2 · Σ F·(θ − θ0)²      its gradient λ·F·(θ − θ0)
    decay toward θ0 (decoupled, just before the optimiser step):  θ ← θ − lr·wd·(θ − θ0)

The penalty's gradient is added to `.grad` after backward instead of going through autograd: the
same gradient without a graph over every parameter, one tensor-sized temporary at a time. It
counts in the clipped gradient norm, as the gradient of loss + penalty would. θ0 is a frozen copy
in the parameters' dtype (4 B/param in fp32); EWC keeps F beside it (another 4 B/param).

F is the diagonal empirical Fisher at θ0: the mean over general sequences of the squared gradient
of each sequence's mean token NLL, computed one sequence at a time.

Under FSDP2 every tensor here is this rank's shard of it (θ0, F, the penalty's terms), sums are
taken over ranks, and for the Fisher every rank runs the same sequence so that the averaged,
reduce-scattered gradient is that sequence's own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fulltune import distributed as D
from fulltune.data.loader import collate, count_targets
from fulltune.loss import loss_sum


class Anchor:
    """θ0 kept beside the model, and the pulls toward it."""

    def __init__(self, model: torch.nn.Module, lam: float = 0.0, fisher: list[torch.Tensor] | None = None):
        self.params = list(model.parameters())  # a tied tensor is listed once
        self.theta0 = [D.local(p.detach()).clone() for p in self.params]  # this rank's shard under FSDP2
        self.lam, self.fisher = lam, fisher
        assert fisher is None or [f.shape for f in fisher] == [t.shape for t in self.theta0]
        self._theta0_of = {id(p): t for p, t in zip(self.params, self.theta0)}
        self.last_penalty = 0.0

    @property
    def nbytes(self) -> int:
        copies = self.theta0 + (self.fisher or [])
        return sum(t.numel() * t.element_size() for t in copies)

    @torch.no_grad()
    def add_penalty_grad(self) -> float:
        """Add the penalty's gradient to every .grad; record (`last_penalty`) and return the penalty's
        value (λ = 0: nothing added)."""
        if self.lam == 0:
            return 0.0
        terms = []  # each parameter's Σ d·(F·d), read once at the end: one host sync, not one per tensor
        for i, (p, p0) in enumerate(zip(self.params, self.theta0)):
            assert p.grad is not None, "every parameter has a gradient after backward in full fine-tuning"
            d = D.local(p.detach()) - p0
            weighted = d * self.fisher[i] if self.fisher is not None else d
            terms.append(torch.dot(d.flatten(), weighted.flatten()).double())
            grad = D.local(p.grad)
            grad.add_(weighted.to(grad.dtype), alpha=self.lam)
        penalty = float(torch.stack(terms).sum()) if terms else 0.0
        self.last_penalty = 0.5 * self.lam * D.all_sum([penalty])[0]
        return self.last_penalty

    @torch.no_grad()
    def decay_toward_theta0(self, optimizer: torch.optim.Optimizer) -> None:
        """θ ← θ − lr·wd·(θ − θ0) for the groups whose decay pulls toward θ0 (param_groups sets them)."""
        for group in optimizer.param_groups:
            rate = float(group["lr"]) * group.get("decay_to_theta0", 0.0)
            if rate:
                for p in group["params"]:
                    D.local(p).lerp_(self._theta0_of[id(p)], rate)

    @torch.no_grad()
    def distance(self) -> float:
        """‖θ − θ0‖₂ over every parameter."""
        terms = [torch.sum((D.local(p.detach()) - p0) ** 2).double() for p, p0 in zip(self.params, self.theta0)]
        mine = float(torch.stack(terms).sum()) if terms else 0.0  # one host sync
        return D.all_sum([mine])[0] ** 0.5


def estimate_fisher(
    model: torch.nn.Module, examples: list, *, pad_id: int, autocast, progress: bool = False
) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: mean over `examples` of (∂ mean-token-NLL / ∂θ)², one sequence at a time."""
    params = list(model.parameters())
    fisher = [torch.zeros_like(D.local(p.detach()), dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of θ0 itself
    model.zero_grad(set_to_none=True)
    device = D.local(params[0]).device
    for ex in tqdm(examples, desc="EWC Fisher", disable=not progress, dynamic_ncols=True):
        batch = collate([ex], pad_id, device)
        with autocast():
            loss = loss_sum(model, batch) / count_targets(batch)
        loss.backward()  # through FSDP2's hooks: the same sequence on every rank, gradients averaged
        for f, p in zip(fisher, params):
            if p.grad is not None:
                f.add_(D.local(p.grad).float() ** 2)
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return [f / len(examples) for f in fisher]


def fisher_sequences(general: list, n: int, seed: int) -> list:
    """The first n of a seeded permutation of the general sequences (all of them if fewer)."""
    order = torch.randperm(len(general), generator=torch.Generator().manual_seed(seed + 104729)).tolist()
    return [general[i] for i in order[:n]]


def tokens_hash(examples: list) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.target_mask]).encode())
    return h.hexdigest()


def cached_fisher(path: Path, key: dict, compute, reuse: bool = True) -> tuple[list[torch.Tensor], bool]:
    """F from `path` if `reuse` and it was computed with the same `key`, else `compute()` and save it atomically."""
    names_key = json.dumps(key, sort_keys=True)
    cached = None
    if reuse and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                stored = (fh.metadata() or {}).get("key")
            if stored == names_key:
                tensors = load_file(str(path))
                cached = [tensors[str(i)] for i in range(len(tensors))]
        except Exception:  # noqa: BLE001 — a damaged cache is recomputed, never trusted
            pass
    if not D.any_rank(cached is None):  # under FSDP2 every rank reuses its shard, or every rank computes
        return cached, True
    fisher = compute()
    tmp = path.with_name(path.name + ".tmp")
    save_file({str(i): f.contiguous() for i, f in enumerate(fisher)}, str(tmp), metadata={"key": names_key})
    os.replace(tmp, path)
    return fisher, False


def normalise(fisher: list[torch.Tensor]) -> list[torch.Tensor]:
    """F / mean(F) over every element, so λ means the same as in L2-SP for an average parameter."""
    total, count = D.all_sum([sum(float(f.double().sum()) for f in fisher), sum(f.numel() for f in fisher)])
    mean = total / count
    assert mean > 0, "the Fisher is all zeros: no gradient reached the parameters"
    return [f / mean for f in fisher]


def anchor_for_run(
    cfg, run_dir: Path, model: torch.nn.Module, *, general: list, pad_id: int, autocast, resuming: bool, progress: bool
) -> Anchor | None:
    """The run's anchor (None when nothing pulls toward θ0). EWC's Fisher is cached at
    run_dir/fisher.safetensors, keyed on the settings and a hash of the sequences' tokens, and reused
    only when resuming: a fresh start (train.overwrite included) computes it anew."""
    a = cfg.anchor
    if a.method == "none" and cfg.optim.decay_toward != "theta0":
        return None
    fisher = None
    if a.method == "ewc":
        n = a.fisher_batches * cfg.train.micro_batch_size
        seqs = fisher_sequences(general, n, cfg.train.seed)
        key = {
            "model": str(cfg.model.path),
            "general": list(cfg.data.general),
            "sequences": n,
            "max_seq_len": cfg.data.max_seq_len,
            "seed": cfg.train.seed,
            "dtype": str(next(model.parameters()).dtype),
            "tokens_sha256": tokens_hash(seqs),
        }  # edited general data, or another tokenizer: another Fisher
        run_dir.mkdir(parents=True, exist_ok=True)
        name = "fisher.safetensors" if D.world_size() == 1 else f"fisher-rank{D.rank()}-of-{D.world_size()}.safetensors"
        fisher, reused = cached_fisher(
            run_dir / name,
            key,
            lambda: estimate_fisher(model, seqs, pad_id=pad_id, autocast=autocast, progress=progress),
            resuming,
        )
        print(
            f"[anchor] EWC Fisher from {len(seqs)} general sequences "
            f"({'reused ' if reused else 'computed, cached in '}{run_dir / name})",
            flush=True,
        )
        device = D.local(next(model.parameters())).device
        fisher = [f.to(device) for f in (normalise(fisher) if a.fisher_normalize else fisher)]
    anchor = Anchor(model, a.lam if a.method != "none" else 0.0, fisher)
    print(
        f"[anchor] {a.method if a.method != 'none' else 'decay toward θ0'} λ={a.lam:g}: θ0 copy"
        f"{' + Fisher' if fisher else ''} {anchor.nbytes / 1e9:.2f} GB",
        flush=True,
    )
    return anchor
