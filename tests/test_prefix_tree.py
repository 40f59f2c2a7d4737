"""Scoring candidates in a prefix tree equals scoring each alone; an attention that ignores the tree
mask, or a sliding window shorter than the row, falls back to one sequence per row."""

import contextlib

import pytest
import torch
from conftest import make_model, make_tokenizer, sentiment_records

from fulltune.data.formats import Example, encode_record
from fulltune.evals import classify
from fulltune.evals.classify import score_sequences, tree_is_exact
from fulltune.evals.prefix_tree import collate_tree, groups, tree_row


def _alone(model, examples, pad_id):
    """Each example in its own batch, the plain next-token path (no tree, no padding)."""
    from fulltune.data.loader import collate
    from fulltune.loss import target_logprobs

    with torch.no_grad():
        return [float(target_logprobs(model, collate([e], pad_id))[0].double().sum()) for e in examples]


def _candidates(tok, records, labels=("positive", "negative")):
    out = []
    for r in records:
        for label in labels:
            msgs = [dict(m) for m in r["messages"]]
            msgs[-1]["content"] = label
            out.append(encode_record(tok, {"messages": msgs}, "messages", loss_on="completion", where="test"))
    return out


def _branches_per_row(monkeypatch) -> list[int]:
    """Spy on score_sequences: the most branches in each batch it scores."""
    seen: list[int] = []
    real = classify.collate_tree
    monkeypatch.setattr(
        classify, "collate_tree", lambda rows, *a: seen.append(max(max(r.branch) for r in rows)) or real(rows, *a)
    )
    return seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_scores_equal_each_candidate_alone(attn, monkeypatch):
    seen = _branches_per_row(monkeypatch)
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    model.config._attn_implementation = attn
    examples = _candidates(tok, sentiment_records(7, seed=5))
    examples += [
        Example([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]),
        Example([5, 6, 7, 10], [0, 0, 1, 1]),  # context [5, 6]:
        Example([5, 6, 7, 8, 9, 11, 12], [0, 0, 1, 1, 1, 1, 1]),  # three branches
        Example([5, 6, 7, 8], [0, 0, 0, 1]),
        Example([4, 3], [0, 1]),
    ]  # other contexts: alone
    assert groups(examples)[:7] == [[2 * i, 2 * i + 1] for i in range(7)]
    assert groups(examples)[7:] == [[14, 15, 16], [17], [18]]
    tree = score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=3, autocast=contextlib.nullcontext)
    assert tree == pytest.approx(_alone(model, examples, tok.pad_token_id), rel=1e-5, abs=1e-5)
    assert all(s < 0 for s in tree)
    assert max(seen) == 3  # scored as trees (not the fallback), the three-branch row included


def test_a_tree_row_predicts_each_first_token_from_the_context_end():
    examples = [Example([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), Example([1, 2, 3, 6], [0, 0, 0, 1])]
    row = tree_row(examples, [0, 1])
    assert row.input_ids == [1, 2, 3, 4, 5, 6] and row.positions == [0, 1, 2, 3, 4, 3]
    assert row.branch == [0, 0, 0, 1, 1, 2]
    assert row.targets == [(0, 2, 4), (0, 3, 5), (1, 2, 6)]
    sees = collate_tree([row], 0, "cpu", "bool")["attention_mask"][0, 0]
    assert sees[5].tolist() == [True, True, True, False, False, True]  # branch 2 sees the context, not branch 1


def test_an_attention_that_ignores_the_tree_mask_is_caught_and_scored_alone(capsys):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):  # drops the mask: plain causal
        return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})

    AttentionInterface.register("causal_only_test", causal_only)
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    model.config._attn_implementation = "causal_only_test"
    assert tree_is_exact(model, "bool", 50) is False
    assert "does not honour a prefix-tree mask" in capsys.readouterr().out
    model.config._attn_implementation = "sdpa"
    fresh = make_model(len(tok)).eval()
    assert tree_is_exact(fresh, "bool", 50) is True


def test_a_sliding_window_shorter_than_the_row_scores_each_alone(monkeypatch):
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    examples = _candidates(tok, sentiment_records(3, seed=1))
    model.config.sliding_window = 4  # shorter than any row: the model's own 2D path must apply it
    seen = _branches_per_row(monkeypatch)
    score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=2, autocast=contextlib.nullcontext)
    assert seen and max(seen) == 1  # never more than one branch per row
    model.config.sliding_window = None
    seen.clear()
    score_sequences(model, examples, pad_id=tok.pad_token_id, batch_size=2, autocast=contextlib.nullcontext)
    assert max(seen) == 2
