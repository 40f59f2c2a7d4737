"""β·KL(θ0 ‖ θ) at the training targets without a θ0 copy: θ0's top-k kept once before step 1.

`loss.kl_reference: cached` scores θ0 once, before step 1, on every sequence the run can train on
(the task's rows, packed or not, and data.general / data.replay when mixed in), and keeps at each
target position θ0's K most likely next tokens and the log of the rest (the drift monitor's
`Theta0Reference`, evals/drift.py). The loss then compares θ's distribution with that coarsened θ0
(`drift.coarse_kl_logp`): no frozen model in memory, no second forward per micro-batch, at
8·K + 4 bytes per target position. The coarsened KL is a lower bound of the full one
(data-processing inequality); docs/drift.md measured K = 256 at 0.91–0.97 of it on SmolLM2-135M
(task answers, fine-tuned: 0.973). `live` (the default) keeps the frozen θ0 copy: exact.

A micro-batch row is found in the reference by its content (`row_key`): its tokens up to its last
target and the positions of its targets. Causal attention makes θ0's distributions at those targets
a function of exactly that, whatever the batch's padding or order. The reference is saved in the run
directory (kl-theta0.safetensors) and read back on resume (θ0 is scored again if it is missing or
damaged: the model is still θ0 at that point).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fulltune.distributed as D
from fulltune.data.formats import Example
from fulltune.data.loader import IGNORE
from fulltune.errors import UserError
from fulltune.evals import drift

K = 256
FILE = "kl-theta0.safetensors"


def row_key(ids: list[int], at: list[int]) -> str:
    """A row's identity for θ0's distributions at its targets: its tokens up to the last target
    (`at`: positions t whose next token is a target), and `at` itself."""
    head = ids[: at[-1] + 2] if at else []
    return hashlib.sha1(repr((head, at)).encode()).hexdigest()


def batch_keys(batch: dict) -> list[str | None]:
    """Each batch row's key (None for a row without targets: padding, a null micro-batch)."""
    labels = batch["labels"][:, 1:] != IGNORE
    ids = batch["input_ids"].tolist()
    out = []
    for r, row in enumerate(labels):
        at = row.nonzero().flatten().tolist()
        out.append(row_key(ids[r], at) if at else None)
    return out


@dataclass
class CachedKL:
    """θ0's coarsened distributions at every target the run can train on, found by `row_key`."""

    ref: drift.Theta0Reference
    index: dict[str, tuple[int, int]]  # row key → (first reference row, rows)

    @classmethod
    def of(cls, ref: drift.Theta0Reference, examples: list[Example]) -> CachedKL:
        starts = [0, *torch.cumsum(ref.scored, 0).tolist()[:-1]]
        index = {}
        for e, start, n in zip(examples, starts, ref.scored.tolist()):
            index[row_key(e.input_ids, drift.scored_positions(e))] = (start, n)
        return cls(ref, index)

    def kl_sum(self, logp: torch.Tensor, batch: dict) -> torch.Tensor:
        """Σ over the batch's targets of the coarsened KL(θ0 ‖ θ); `logp` [N, V]: θ's log-probabilities at
        the targets in `loss.target_logits`' order (row-major)."""
        rows = []
        for key in batch_keys(batch):
            if key is None:
                continue
            start, n = self.index[key]  # every trainable row was scored before step 1 (KeyError: a bug)
            rows.append(torch.arange(start, start + n))
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        assert rows.numel() == logp.shape[0], "the reference holds each row's targets, in order"
        ref = (t[rows].to(logp.device) for t in (self.ref.top_ids, self.ref.top_logp, self.ref.tail_logp))
        return drift.coarse_kl_logp(logp, *ref).sum()


def trainable(data) -> list[Example]:
    """Every distinct row the sampler can draw that has a target: the task's, then the mixed-in ones."""
    seen, out = set(), []
    for e in [*data.train, *(data.general or [])]:
        at = drift.scored_positions(e)
        key = row_key(e.input_ids, at)
        if at and key not in seen:
            seen.add(key)
            out.append(e)
    return out


def reference_for_run(cfg, run_dir: Path, model, data, *, autocast, precision: str, resuming: bool) -> tuple:
    """(CachedKL or None, [(reference, path, key)] to save once the run directory is started), built
    from θ0 now (before a checkpoint's weights load) or read back on resume."""
    if cfg.loss.kl_to_theta0 <= 0 or cfg.loss.kl_reference != "cached":
        return None, []
    examples = trainable(data)
    if not examples:
        raise UserError(
            "loss.kl_reference: cached: the training data has no target tokens to keep θ0's distributions at"
        )
    key = {"model": cfg.model.path, "precision": precision, "max_seq_len": cfg.data.max_seq_len, "for": "kl_to_theta0"}
    path, full_key = Path(run_dir) / FILE, drift.reference_key(key, examples, k=K, positions="target")
    ref = drift.Theta0Reference.load(path, full_key) if resuming else None
    unsaved, started = [], time.perf_counter()
    if ref is None:
        if resuming:
            print(f"[loss] {path}: missing, damaged or from other settings; scoring θ0 again", flush=True)
        ref = drift.build_reference(model, examples, autocast=autocast, batch_size=cfg.eval.batch_size, k=K)
        unsaved.append((ref, path, full_key))
        D.reshard(model)  # FSDP2 keeps the root's weights gathered after a forward: the resume loads shards
    how = "read back" if not unsaved else f"{time.perf_counter() - started:.0f} s"
    print(
        f"[loss] KL(θ0 ‖ θ) from θ0's top {ref.k} kept at {ref.n_positions:,} target positions of "
        f"{len(examples):,} rows: {ref.nbytes / 1e6:.1f} MB, no θ0 copy ({how})",
        flush=True,
    )
    return CachedKL.of(ref, examples), unsaved
