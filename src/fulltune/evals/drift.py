"""Drift from θ0 without keeping θ0: KL(θ0 ‖ θ) per token on fixed sequences, from θ0's top-k.

Forgetting tracks the forward KL between the base model and the fine-tuned one measured on the
task's own data (RL's Razor, arXiv 2509.04259), and it needs no benchmark. Keeping θ0 in memory to
measure it would cost a second model; instead, before step 1, `build_reference` scores θ0 once on a
fixed list of sequences and keeps, per scored position, θ0's k most likely next tokens (int32 ids,
fp32 log-probs) and the log of the remaining tail mass: 8k + 4 bytes a position. At each validation
point `kl_per_token` runs θ once over the same sequences and compares. A run keeps one reference
per named set (`references: dict[str, Theta0Reference]`, e.g. "task": held-out task sequences,
"general": general text) and logs `kl_report`'s `kl_<name>` numbers. docs/drift.md: the measured k.

Distributed (FSDP2): every rank must join every forward, so each rank scores its share of the
batches (`D.my_share`, null micro-batches where its share is shorter, as `validation_loss` does);
the build gathers the shares in rank order (contiguous shares: sequence order) and the KL sums
(KL, positions) over the ranks with `D.all_sum`. Every rank holds the whole reference
(tests/test_drift.py: two gloo ranks on a replicated model give the one-process reference and KL).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fulltune.distributed as D
from fulltune.data.formats import Example
from fulltune.data.loader import collate_or_null
from fulltune.loss import target_logits

POSITIONS = ("target", "all")
# The smallest k whose estimate was within 5% of the exact KL on all nine cases of docs/drift.md
# (SmolLM2-135M: 0.981–0.999 of it); k = 1024 gave 0.934–0.992 at a quarter of the bytes.
DEFAULT_K = 4096
FORMAT = 1
CHUNK_ROWS = 256  # rows of full-vocabulary log-softmax at a time: 256 × 49,152 × 4 B = 50 MB for SmolLM2
TENSORS = ("tokens", "lengths", "scored", "at", "top_ids", "top_logp", "tail_logp")


@dataclass
class Theta0Reference:
    """θ0's next-token distributions at the scored positions of fixed sequences, coarsened to its
    top-k tokens plus one tail bucket. Rows of `top_*`/`tail_logp`/`at` follow the sequences in order."""

    k: int  # θ0's most likely tokens kept per position
    positions: str  # "target" (default): positions predicting a target token; "all": every position but the last
    tokens: torch.Tensor  # int32 [T]: the sequences' tokens, concatenated
    lengths: torch.Tensor  # int32 [S]: each sequence's length
    scored: torch.Tensor  # int32 [S]: each sequence's scored positions (its rows)
    at: torch.Tensor  # int32 [P]: the position within its sequence whose next-token distribution a row holds
    top_ids: torch.Tensor  # int32 [P, k]: θ0's top-k token ids, most likely first
    top_logp: torch.Tensor  # float32 [P, k]: their log-probabilities under θ0 (bf16 moved θ0's own KL by ±1e-4)
    tail_logp: torch.Tensor  # float32 [P]: log of θ0's mass outside the top k (−inf when k is the vocabulary)

    @property
    def n_positions(self) -> int:
        return int(self.at.numel())

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in TENSORS)

    def examples(self) -> list[Example]:
        """The sequences (ids only: the scored positions are `at`)."""
        ids = self.tokens.tolist()
        out, start = [], 0
        for n in self.lengths.tolist():
            out.append(Example(ids[start : start + n], [1] * n))
            start += n
        return out

    def save(self, path: Path, key: dict | None = None) -> None:
        """Atomically: the tensors in safetensors, with a JSON header of k, positions, `key` (what the
        caller built it from) and a sha256 of the tensors' bytes, so corruption is caught on load."""
        tensors = {name: getattr(self, name).contiguous() for name in TENSORS}
        header = {"format": FORMAT, "k": self.k, "positions": self.positions, "key": key, "sha256": _digest(tensors)}
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        save_file(tensors, str(tmp), metadata={"fulltune_drift": json.dumps(header, sort_keys=True)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, key: dict | None = None) -> Theta0Reference | None:
        """The reference saved at `path` with this `key`; None when it is missing, truncated, corrupt or
        was built from something else (the caller says so in one line and builds it anew)."""
        try:
            with safe_open(str(path), "pt") as fh:
                header = json.loads((fh.metadata() or {})["fulltune_drift"])
            tensors = load_file(str(path))
            if (
                header["format"] != FORMAT
                or header["key"] != json.loads(json.dumps(key))
                or header["sha256"] != _digest(tensors)
            ):
                return None
            ref = cls(k=header["k"], positions=header["positions"], **{n: tensors[n] for n in TENSORS})
        except Exception:  # noqa: BLE001 — a damaged file is rebuilt, never trusted
            return None
        return ref if ref.consistent() else None

    def consistent(self) -> bool:
        p = self.n_positions
        return (
            self.positions in POSITIONS
            and int(self.lengths.sum()) == self.tokens.numel()
            and int(self.scored.sum()) == p
            and self.top_ids.shape == self.top_logp.shape == (p, self.k)
            and self.tail_logp.shape == (p,)
        )


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in TENSORS:
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scored_positions(example: Example, positions: str = "target") -> list[int]:
    """Positions t < len − 1 whose next token is scored: every one ("all") or those whose next token
    is a target ("target": where the run's loss and validation loss are measured)."""
    assert positions in POSITIONS, positions
    assert positions == "target" or not example.lengths, "every position of a packed row crosses sequences"
    n = len(example.input_ids)
    return [t for t in range(n - 1) if positions == "all" or example.target_mask[t + 1]]


def position_logits(model, batch: dict, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits [N, V] at (rows, positions), through the model's own forward
    (`loss.target_logits`: only those positions go through a plain LM head)."""
    return target_logits(model, {**batch, "score_at": (rows, positions, None)})[0]


def _batches(model, examples: list[Example], positions: list[list[int]], *, autocast, batch_size: int):
    """Per batch of this rank's share: (the sequence indices, their logits at the scored positions)."""
    device = D.local(next(model.parameters())).device
    chunks = [list(range(s, min(s + batch_size, len(examples)))) for s in range(0, len(examples), batch_size)]
    for idx in D.my_share(chunks, batch_size):  # every chunk when there is one process
        batch = collate_or_null([examples[i] for i in idx], examples[0], 0, device)  # pad id: masked by length
        rows = torch.tensor([r for r, i in enumerate(idx) for _ in positions[i]], dtype=torch.long, device=device)
        at = torch.tensor([t for i in idx for t in positions[i]], dtype=torch.long, device=device)
        with autocast():
            logits = position_logits(model, batch, rows, at)
        yield idx, logits


def _top_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ0's (top-k ids, their log-probs, log tail mass) per row, in fp32, CHUNK_ROWS rows at a time."""
    ids, top, tail = [], [], []
    for part in logits.split(CHUNK_ROWS):
        logp = torch.log_softmax(part.float(), dim=-1)
        values, index = logp.topk(k, dim=-1)
        ids.append(index.to(torch.int32))
        top.append(values)
        # The tail as a log-sum-exp over the tokens outside the top k: exact, no 1 − Σp cancellation.
        tail.append(torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1))
    return torch.cat(ids), torch.cat(top), torch.cat(tail)


def _eval_mode(fn):
    """Run `fn` with the model in eval mode and no autograd; restore both afterwards."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return run


@_eval_mode
def build_reference(
    model, examples: list[Example], *, autocast, batch_size: int, k: int = DEFAULT_K, positions: str = "target"
) -> Theta0Reference:
    """θ0's reference on `examples` (the model as it is now: call it before step 1)."""
    at = [scored_positions(e, positions) for e in examples]
    assert examples and sum(map(len, at)) > 0, "no scored positions"
    k = min(k, model.get_output_embeddings().weight.shape[0])
    mine = {}  # sequence index → its rows (ids, log-probs, tail)
    for idx, logits in _batches(model, examples, at, autocast=autocast, batch_size=batch_size):
        sizes = [len(at[i]) for i in idx]
        ids, top, tail = (t.cpu().split(sizes) for t in _top_and_tail(logits, k))
        mine.update({i: (ids[j], top[j], tail[j]) for j, i in enumerate(idx)})
    parts = {i: p for share in D.gather(mine) for i, p in share.items()}  # every rank: the whole reference
    ordered = [parts[i] for i in range(len(examples))]
    return Theta0Reference(
        k=k,
        positions=positions,
        tokens=torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        lengths=torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int32),
        scored=torch.tensor([len(a) for a in at], dtype=torch.int32),
        at=torch.tensor([t for a in at for t in a], dtype=torch.int32),
        top_ids=torch.cat([p[0] for p in ordered]),
        top_logp=torch.cat([p[1] for p in ordered]),
        tail_logp=torch.cat([p[2] for p in ordered]),
    )


def coarse_kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor):
    """Per row, KL(p0 ‖ pθ) on the coarsened distribution (θ0's top-k tokens + one tail bucket):
    Σ_top-k p0·(log p0 − log pθ) + tail0·(log tail0 − log tailθ), tailθ = pθ's mass outside θ0's
    top-k ids, a log-sum-exp over those tokens (exact in log space; clamped so it stays finite)."""
    parts = zip(*(t.split(CHUNK_ROWS) for t in (logits, top_ids, top_logp, tail_logp)))
    return torch.cat([coarse_kl_logp(torch.log_softmax(part.float(), dim=-1), *ref) for part, *ref in parts])


def coarse_kl_logp(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, tail_logp: torch.Tensor):
    """`coarse_kl` from θ's log-probabilities [N, V] (differentiable: the training loss uses it too)."""
    index = top_ids.long()
    top = logp.gather(-1, index)
    tail = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1).clamp(min=-1e4)
    kl = (top_logp.exp() * (top_logp - top)).sum(-1)
    mass0 = tail_logp.exp()
    return kl + torch.where(mass0 > 0, mass0 * (tail_logp - tail), torch.zeros_like(kl))  # 0·log 0 = 0


@_eval_mode
def kl_per_token(model, ref: Theta0Reference, autocast, batch_size: int) -> float:
    """Mean over the reference's positions of KL(θ0 ‖ θ) on the coarsened distribution (`coarse_kl`).

    Coarsening is a function of the token, so by the data-processing inequality this is a lower bound
    of the full-vocabulary KL, equal to it when k is the vocabulary; docs/drift.md measures how close
    it is for each k on SmolLM2-135M (DEFAULT_K: within 5% on every case measured)."""
    return kl_and_nll(model, ref, autocast, batch_size)[0]


@_eval_mode
def kl_and_nll(model, ref: Theta0Reference, autocast, batch_size: int) -> tuple[float, float]:
    """(KL(θ0 ‖ θ) per token, θ's NLL per token of the sequences' own next tokens) at the reference's
    positions, from one forward: on the validation sequences' target positions the NLL is the
    validation loss, so a validation point measures both at the cost of one."""
    examples = ref.examples()
    at = [a.tolist() for a in ref.at.split(ref.scored.tolist())]
    start = torch.cumsum(ref.scored, 0).tolist()
    start = [0] + start[:-1]
    total, nll, n = 0.0, 0.0, 0
    for idx, logits in _batches(model, examples, at, autocast=autocast, batch_size=batch_size):
        rows = torch.cat([torch.arange(start[i], start[i] + len(at[i])) for i in idx]) if idx else torch.arange(0)
        dev = logits.device
        ref_rows = (t[rows].to(dev) for t in (ref.top_ids, ref.top_logp, ref.tail_logp))
        total += float(coarse_kl(logits, *ref_rows).double().sum())
        nexts = torch.tensor([examples[i].input_ids[t + 1] for i in idx for t in at[i]], dtype=torch.long, device=dev)
        nll += float(torch.nn.functional.cross_entropy(logits.float(), nexts, reduction="sum"))
        n += int(rows.numel())
    total, nll, n = D.all_sum([total, nll, n])
    return total / n, nll / n


def kl_report(model, references: dict[str, Theta0Reference], autocast, batch_size: int) -> dict[str, float]:
    """`kl_<name>` for each named reference (e.g. kl_task, kl_general): a validation point's record."""
    return {f"kl_{name}": kl_per_token(model, ref, autocast, batch_size) for name, ref in references.items()}


def reference_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / f"drift-{name}.safetensors"


def reference_key(key: dict, examples: list[Example], *, k: int, positions: str) -> dict:
    """`key` plus what the reference itself depends on: k, the positions and the sequences' tokens."""
    tokens = json.dumps([[e.input_ids, e.target_mask] for e in examples]).encode()
    return {**key, "k": k, "positions": positions, "tokens_sha256": hashlib.sha256(tokens).hexdigest()}


def load_or_build(
    path: Path, model, examples: list[Example], *, key: dict, reuse: bool, **build
) -> tuple[Theta0Reference, bool]:
    """The reference at `path` when `reuse` (a resumed run) and it was built from the same key and
    sequences; else built now and saved: (reference, reused). Call it once θ0 is loaded and before a
    checkpoint's weights are, so a rebuild on resume still scores θ0. `key`: what else decides θ0's
    scores (model path, precision, max_seq_len); `build`: autocast, batch_size, k, positions."""
    full_key = reference_key(key, examples, k=build.get("k", DEFAULT_K), positions=build.get("positions", "target"))
    ref = Theta0Reference.load(path, full_key) if reuse else None
    if reuse and not D.any_rank(ref is None):
        return ref, True
    if reuse:
        print(f"[drift] {path} missing, damaged or built from other settings: rebuilding from θ0", flush=True)
    ref = build_reference(model, examples, **build)
    if D.is_main():
        ref.save(path, full_key)
    D.barrier()
    return ref, False


def references_for_run(cfg, run_dir: Path, model, data, *, autocast, precision: str, resuming: bool) -> tuple:
    """The drift monitor's references (`eval.drift`): "task", θ0 at the held-out task sequences'
    target tokens (the new task's own answers, as RL's Razor measures), and "general", θ0 at every
    token of general text. Built from θ0 now, before a checkpoint's weights load; a resumed run reads
    its own back when their key matches. Returns (references, [(reference, path, key)] to save once
    the run directory is started: a fresh start clears the old run's files there first)."""
    if not cfg.eval.drift:
        return {}, []
    key = {"model": cfg.model.path, "precision": precision, "max_seq_len": cfg.data.max_seq_len}
    refs, unsaved = {}, []
    for name, examples, positions in (("task", data.val, "target"), ("general", data.drift_general, "all")):
        if not examples:
            continue
        path, full_key = reference_path(run_dir, name), reference_key(key, examples, k=DEFAULT_K, positions=positions)
        ref = Theta0Reference.load(path, full_key) if resuming else None
        if D.any_rank(ref is None):
            if resuming:
                print(f"[drift] {path}: missing, damaged or from other settings; scoring θ0 again", flush=True)
            ref = build_reference(
                model, examples, autocast=autocast, batch_size=cfg.eval.batch_size, positions=positions
            )
            unsaved.append((ref, path, full_key))
        refs[name] = ref
    if unsaved:
        D.reshard(model)  # FSDP2 keeps the root's weights gathered after a forward: the resume loads shards
    if refs:
        sizes = ", ".join(f"{n} {r.n_positions} positions" for n, r in refs.items())
        print(f"[drift] KL(θ0 ‖ θ) at every validation point on {sizes} (θ0's top {DEFAULT_K} kept)", flush=True)
    return refs, unsaved


def save_references(unsaved: list) -> None:
    if D.is_main():
        for ref, path, key in unsaved:
            ref.save(path, key)
    D.barrier()
