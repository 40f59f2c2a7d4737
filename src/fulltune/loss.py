"""Log-probabilities of target tokens only: the LM head runs where a token carries loss.

In SFT with prompt masking most positions carry no loss, and the vocabulary projection plus its
fp32 log-softmax (b·s·V) is often the largest activation. For architectures whose logits are a
plain linear map of the final hidden state we project only the target positions (a pre-hook on
the LM head, inside the model's own forward, so the same call works on an FSDP2-sharded model); for anything
else (soft-capping, logit scaling) we take the model's own logits, so we are never silently wrong.

The training objective (`loss:` in the config, `Objective`) is a sum over the target tokens, which
the step divides by N, its target tokens over every micro-batch and rank (train.train_step):
    ce   (default)   −log p_t                                  `loss_sum`, today's path, untouched
    dft              −sg(p_t)·log p_t                          DFT, arXiv 2508.05629
    + β·KL(p_θ0 ‖ p_θ) at each target position (full vocabulary, θ0 frozen)   loss.kl_to_theta0
dft + β > 0 is ASFT (arXiv 2509.23753). What we matched: TRL's `dft_loss` (trl/trainer/sft_trainer.py)
weights each token's log-prob by `logprobs.exp().detach()` and divides the masked sum by the batch's
target count, as here; ASFT's reference (zhuchichi56/ASFT train.py) adds
`kl_weight · F.kl_div(log_softmax(θ logits), softmax(θ0 logits))` summed over the vocabulary at every
target position and averages over the target tokens: the forward KL, θ0's distribution first (as in
RL's Razor, arXiv 2509.04259), which is what `Objective.sums` computes (token-normalised by the step's N).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fulltune.data.loader import IGNORE
from fulltune.data.packing import as_one_row, one_row

PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"}


def plain_head(model) -> bool:
    return getattr(model.config, "model_type", None) in PLAIN_HEAD_TYPES


def target_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token in fp32 [N], its batch row [N]), next-token shifted.

    `batch["score_at"]` = (rows, positions, tokens), where given: the targets at explicit positions
    (evals/prefix_tree.py: one position may predict several candidates' first tokens)."""
    logits, targets, rows = target_logits(model, batch)
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    return logp, rows


def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the full-vocabulary logits at the target positions [N, V] in the forward's dtype, the target
    tokens [N], their batch rows [N]), next-token shifted; `score_at` as in `target_logprobs`."""
    if "score_at" in batch:
        rows, positions, targets = batch["score_at"]
    else:
        labels = batch["labels"][:, 1:]
        select = labels != IGNORE
        rows, positions = select.nonzero(as_tuple=True)  # row-major: the order of labels[select]
        targets = labels[select]
    inputs, at = _inputs(batch), (rows, positions)
    if as_one_row(model, inputs):  # flash-attention 2 finds packed sequences in one row only
        width = inputs["input_ids"].shape[1]
        inputs, at = one_row(inputs), (torch.zeros_like(rows), rows * width + positions)
    if plain_head(model):
        # Through the model's own forward (so FSDP2's root hooks gather and reduce its weights), with
        # the LM head's input cut down to the target positions by a pre-hook: logits for N rows, not b·s.
        def only_targets(module, args):
            return (args[0][at],)

        handle = model.get_output_embeddings().register_forward_pre_hook(only_targets)
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            handle.remove()
    else:
        logits = model(**inputs, use_cache=False).logits[at]
    return logits, targets, rows


def _inputs(batch: dict) -> dict:
    """The model's inputs: ids with an attention mask, or (packed rows) with position ids and no mask."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the target tokens' cross-entropy (divide by the step's target count outside)."""
    logp, _ = target_logprobs(model, batch)
    return -logp.sum()


class LossSums(NamedTuple):
    """One micro-batch's sums over its target tokens (the step divides each by its N)."""

    objective: torch.Tensor  # what backward runs on: Σ per-token loss (+ β·Σ KL)
    # The parts are detached 0-d tensors, not numbers: reading one is a host sync (on CUDA, a wait for
    # the GPU), so the step reads all of its micro-batches' parts at once (train._backward).
    ce: torch.Tensor  # Σ −log p_t: the step's reported loss whatever the objective (validation loss is CE too)
    dft: torch.Tensor  # Σ −p_t·log p_t (loss.type dft; else 0)
    kl: torch.Tensor  # Σ KL(p_θ0 ‖ p_θ) over the target positions (β > 0; else 0)


@dataclass
class Objective:
    """The run's training loss, built once (`objective_for_run`): its type, β, and θ0 for the KL."""

    type: str = "ce"  # ce | dft
    kl_beta: float = 0.0  # β ≥ 0
    theta0: torch.nn.Module | None = None  # frozen θ0 (eval mode, no gradients): β > 0, loss.kl_reference live
    cached: object | None = None  # kl_reference.CachedKL: β > 0, loss.kl_reference cached (set before step 1)

    def __post_init__(self) -> None:
        assert self.type in ("ce", "dft") and self.kl_beta >= 0
        assert self.kl_beta > 0 or (self.theta0 is None and self.cached is None), "θ0 is kept only for the KL"

    @property
    def theta0_nbytes(self) -> int:
        if self.theta0 is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.theta0.parameters())

    def sums(self, model, batch: dict) -> LossSums:
        """The micro-batch's objective (a graph to backpropagate) and its parts (detached, not read)."""
        if self.type == "ce" and self.kl_beta == 0:  # today's path, bit for bit
            s = loss_sum(model, batch)
            zero = s.new_zeros(())
            return LossSums(s, s.detach(), zero, zero)
        logits, targets, _ = target_logits(model, batch)
        logq = F.log_softmax(logits.float(), dim=-1)  # [N, V], fp32 as in `target_logprobs`
        logp = logq.gather(-1, targets[:, None]).squeeze(-1)
        ce, zero = -logp.detach().sum(), logp.new_zeros(())
        if self.type == "dft":
            total = -(logp.detach().exp() * logp).sum()  # the weight p_t carries no gradient
            dft = total.detach()
        else:
            total, dft = -logp.sum(), zero
        kl = zero
        if self.kl_beta > 0:
            kl_sum = self._kl_sum(logq, batch)
            total, kl = total + self.kl_beta * kl_sum, kl_sum.detach()
        return LossSums(total, ce, dft, kl)

    def _kl_sum(self, logq: torch.Tensor, batch: dict) -> torch.Tensor:
        """Σ_t KL(p_θ0 ‖ p_θ): from the live θ0 over the full vocabulary, or from θ0's cached top-k."""
        if self.theta0 is None:
            assert self.cached is not None, "β > 0 with loss.kl_reference cached: the reference is built before step 1"
            return self.cached.kl_sum(logq, batch)
        with torch.no_grad():
            p0 = F.softmax(target_logits(self.theta0, batch)[0].float(), dim=-1)
        return F.kl_div(logq, p0, reduction="sum")  # Σ_t Σ_v p0·(log p0 − log q): θ0's distribution first


def objective_for_run(loss_cfg, model: torch.nn.Module) -> Objective:
    """The run's objective from `cfg.loss`; with β > 0 and loss.kl_reference live, a frozen copy of
    `model` as it is now (θ0: call before any update, resume or compile), in the model's own dtype and
    device (cached: run_setup sets `cached` from kl_reference.reference_for_run before step 1)."""
    beta, theta0 = loss_cfg.kl_to_theta0, None
    if beta > 0 and loss_cfg.kl_reference == "live":
        theta0 = copy.deepcopy(model).eval().requires_grad_(False)
    objective = Objective(loss_cfg.type, beta, theta0)
    if loss_cfg.type != "ce" or beta > 0:
        kl = f", β·KL(θ0 ‖ θ) β={beta:g}: " + (
            f"frozen θ0 copy {objective.theta0_nbytes / 1e9:.2f} GB"
            if theta0 is not None
            else "θ0's top-k, kept before step 1"
        )
        asft = " (ASFT)" if loss_cfg.type == "dft" and beta > 0 else ""
        print(f"[loss] {loss_cfg.type}{kl if beta > 0 else ''}{asft}", flush=True)
    return objective
