"""Packing and length-grouped batching: the packed step is the unpacked step, sequences never see
each other, grouping keeps every sequence once per epoch, and both resume exactly."""

import json

import pytest
import torch
from conftest import make_model, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.config import load_config
from fulltune.data.formats import Example
from fulltune.data.loader import StepSampler, collate, count_targets
from fulltune.data.packing import check_isolation, fill, pack, position_ids
from fulltune.errors import UserError
from fulltune.loss import _inputs, loss_sum
from fulltune.train import run_training

VOCAB = 64


def _examples(n, seed=0, lo=4, hi=20):
    """Prompt + completion sequences; every third one carries loss on all its tokens (text data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = 0 if k % 3 == 0 else int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Example(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def test_pack_places_every_sequence_once_in_rows_that_fit():
    examples = _examples(60)
    rows = pack(examples, 48, seed=3)
    assert all(len(r.input_ids) <= 48 and sum(r.lengths) == len(r.input_ids) for r in rows)
    assert sorted(n for r in rows for n in r.lengths) == sorted(len(e.input_ids) for e in examples)
    assert sum(len(r.lengths) for r in rows) == 60 and len(rows) < 30
    assert fill(rows, 48) > 0.9  # best fit: rows nearly full
    assert [r.input_ids for r in pack(examples, 48, seed=3)] == [r.input_ids for r in rows]  # seeded
    assert [r.input_ids for r in pack(examples, 48, seed=4)] != [r.input_ids for r in rows]
    # each sequence's first token carries no loss (nothing of its own predicts it); its others keep theirs
    assert sum(sum(r.target_mask) for r in rows) == sum(sum(e.target_mask[1:]) for e in examples)
    assert position_ids((3, 2), 7) == [0, 1, 2, 0, 1, 0, 1]


def _loss_and_grads(model, batches, n):
    model.zero_grad()
    total = 0.0
    for b in batches:
        s = loss_sum(model, b)
        (s / n).backward()
        total += float(s.detach())
    return total / n, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_a_packed_step_has_the_loss_and_gradients_of_the_same_sequences_unpacked():
    torch.manual_seed(0)
    model = make_model(VOCAB, layers=2)
    examples = _examples(12)
    plain = [collate(examples[i : i + 4], 2) for i in range(0, 12, 4)]
    rows = pack(examples, 40, seed=0)
    packed = [collate(rows, 2)]
    assert "attention_mask" not in packed[0] and any(len(r.lengths) > 1 for r in rows)
    n = sum(count_targets(b) for b in plain)
    assert n == count_targets(packed[0])
    loss_a, grads_a = _loss_and_grads(model, plain, n)
    loss_b, grads_b = _loss_and_grads(model, packed, n)
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    for k in grads_a:
        scale = float(grads_a[k].abs().max())
        assert float((grads_a[k] - grads_b[k]).abs().max()) <= 1e-5 * scale + 1e-9, k


def _logits(model, batch):
    with torch.no_grad():
        return model(**_inputs(batch), use_cache=False).logits


def test_changing_one_sequence_leaves_the_others_logits_unchanged():
    """Within a row (block-diagonal attention) and across rows; a 2D attention mask, which switches
    transformers' packed-sequence detection off (PR #46634), would fail this: shown as a control."""
    model = make_model(VOCAB, layers=2).eval()
    a, b, c, d = _examples(4, seed=1, lo=6, hi=9)
    rows = [
        Example(a.input_ids + b.input_ids, a.target_mask + b.target_mask, (len(a.input_ids), len(b.input_ids))),
        Example(c.input_ids + d.input_ids, c.target_mask + d.target_mask, (len(c.input_ids), len(d.input_ids))),
    ]
    changed_a = Example([(t + 5) % VOCAB for t in a.input_ids], a.target_mask)
    rows2 = [Example(changed_a.input_ids + b.input_ids, rows[0].target_mask, rows[0].lengths), rows[1]]
    before, after = collate(rows, 2), collate(rows2, 2)
    la, lb = _logits(model, before), _logits(model, after)
    na = len(a.input_ids)
    assert not torch.allclose(la[0, :na], lb[0, :na])  # a itself changed
    assert torch.allclose(la[0, na:], lb[0, na:], atol=1e-6)  # b, packed behind a, did not
    assert torch.equal(la[1], lb[1])  # nor the other row
    alone = _logits(model, collate([b], 2))[0]
    assert torch.allclose(la[0, na : na + len(b.input_ids)], alone, atol=1e-5)
    for batch in (before, after):  # control: the same rows with a 2D mask of ones contaminate
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    assert not torch.allclose(_logits(model, before)[0, na:], _logits(model, after)[0, na:], atol=1e-3)


def test_an_attention_that_does_not_isolate_packed_sequences_is_refused(monkeypatch):
    model = make_model(VOCAB, layers=2)
    assert check_isolation(model, torch.device("cpu"), VOCAB) < 1e-5
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # a kernel blind to boundaries
    with pytest.raises(UserError, match="does not keep packed sequences apart"):
        check_isolation(model, torch.device("cpu"), VOCAB)


def test_grouped_batches_hold_every_sequence_once_per_epoch_with_less_padding():
    lengths = [int(x) for x in torch.randint(5, 200, (300,), generator=torch.Generator().manual_seed(0))]

    def padding(sampler):
        pad = real = 0
        for _ in range(sampler.steps_per_epoch):
            for b in sampler.next_step():
                pad += len(b) * max(lengths[i] for i in b)
                real += sum(lengths[i] for i in b)
        return 1 - real / pad

    grouped, plain = StepSampler(300, 8, 2, 5, lengths=lengths), StepSampler(300, 8, 2, 5)
    for epoch in range(2):
        seen = [i for _ in range(grouped.steps_per_epoch) for b in grouped.next_step() for i in b]
        assert sorted(seen) == list(range(300)), epoch
    grouped = StepSampler(300, 8, 2, 5, lengths=lengths)
    assert padding(grouped) < 0.1 < 0.3 < padding(plain)
    a, b = StepSampler(300, 8, 2, 5, lengths=lengths), StepSampler(300, 8, 2, 5, lengths=lengths)
    for _ in range(7):
        a.next_step()
    b.load_state_dict(a.state_dict())  # resumable: the state is (epoch, pos)
    assert [a.next_step() for _ in range(30)] == [b.next_step() for _ in range(30)]
    with pytest.raises(UserError, match="grouped False → True"):
        StepSampler(300, 8, 2, 5, lengths=lengths).load_state_dict(StepSampler(300, 8, 2, 5).state_dict())


@pytest.mark.parametrize("key", ["data.packing", "data.group_by_length"])
def test_packed_and_grouped_runs_resume_exactly(tiny_dir, tmp_path, key):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(40))
    extra = {key: "true", "train.max_steps": 4, "train.save_interval": 2, "data.max_seq_len": 64}
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "straight", **extra)))
    ckpt = tmp_path / "straight" / "checkpoints" / "step-0000002"
    run_training(
        load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "resumed", **extra, **{"train.resume": ckpt}))
    )
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(0 <= r["padding_fraction"] < 1 for r in steps)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    if key == "data.packing":
        assert results["data"]["packing"]["sequences"] == 40 and results["data"]["packing"]["rows"] < 40
        # 4 rows of 64 per step hold more sequences than 4 unpacked ones: more target tokens per step
        assert steps[0]["target_tokens_seen"] > 4 * 3


def test_packing_and_group_by_length_together_is_a_config_error(tmp_path):
    with pytest.raises(UserError, match="data.group_by_length"):
        load_config(None, ["data.packing=true", "data.group_by_length=true"])


def test_flash_attention_on_a_cpu_run_is_refused_before_loading(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(8))
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_dir,
            data,
            tmp_path / "run",
            **{"model.attn_implementation": "flash_attention_2", "train.precision": "bf16-mixed"},
        ),
    )
    with pytest.raises(UserError, match="flash_attention_2 runs on CUDA only"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
