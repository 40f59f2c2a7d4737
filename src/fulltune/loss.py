"""Log-probabilities of target tokens only: the LM head runs where a token carries loss.

In SFT with prompt masking most positions carry no loss, and the vocabulary projection plus its
fp32 log-softmax (b·s·V) is often the largest activation. For architectures whose logits are a
plain linear map of the final hidden state we project only the target positions (a pre-hook on
the LM head, inside the model's own forward, so the same call works on an FSDP2-sharded model); for anything
else (soft-capping, logit scaling) we take the model's own logits, so we are never silently wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fulltune.data.loader import IGNORE

PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"}


def plain_head(model) -> bool:
    return getattr(model.config, "model_type", None) in PLAIN_HEAD_TYPES


def target_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token in fp32 [N], its batch row [N]), next-token shifted.

    `batch["score_at"]` = (rows, positions, tokens), where given: the targets at explicit positions
    (evals/prefix_tree.py: one position may predict several candidates' first tokens)."""
    if "score_at" in batch:
        rows, positions, targets = batch["score_at"]
    else:
        labels = batch["labels"][:, 1:]
        select = labels != IGNORE
        rows, positions = select.nonzero(as_tuple=True)  # row-major: the order of labels[select]
        targets = labels[select]
    if plain_head(model):
        # Through the model's own forward (so FSDP2's root hooks gather and reduce its weights), with
        # the LM head's input cut down to the target positions by a pre-hook: logits for N rows, not b·s.
        def only_targets(module, args):
            return (args[0][rows, positions],)

        handle = model.get_output_embeddings().register_forward_pre_hook(only_targets)
        try:
            logits = model(**_inputs(batch), use_cache=False).logits
        finally:
            handle.remove()
    else:
        logits = model(**_inputs(batch), use_cache=False).logits[rows, positions]
    logp = -F.cross_entropy(logits.float(), targets, reduction="none")
    return logp, rows


def _inputs(batch: dict) -> dict:
    """The model's inputs: ids with an attention mask, or (packed rows) with position ids and no mask."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the target tokens' cross-entropy (divide by the step's target count outside)."""
    logp, _ = target_logprobs(model, batch)
    return -logp.sum()
