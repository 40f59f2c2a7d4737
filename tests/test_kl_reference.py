"""loss.kl_reference cached: θ0's top-k at every trainable target, kept before step 1, in place of a
live θ0 copy. With k the whole vocabulary it is the live KL (value and gradient, padded and packed
rows, any order); with a smaller k a lower bound; a run resumes from its saved reference."""

import contextlib
import json

import pytest
import torch
from conftest import make_model, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file
from test_train import _examples

from fulltune import kl_reference
from fulltune.config import LossConfig, load_config
from fulltune.data.loader import collate
from fulltune.data.packing import pack
from fulltune.errors import UserError
from fulltune.evals import drift
from fulltune.loss import Objective, objective_for_run
from fulltune.train import run_training

NOCAST = contextlib.nullcontext


def _moved(model, seed=1, scale=0.05):
    """θ: θ0 with noise on every weight (a stand-in for a few training steps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _objectives(examples, k):
    """(θ, live objective with a θ0 copy, cached objective from θ0's top-k on `examples`)."""
    model = make_model(64, layers=2, seed=4)
    live = objective_for_run(LossConfig(kl_to_theta0=0.5), model)
    ref = drift.build_reference(model, examples, autocast=NOCAST, batch_size=3, k=k)
    cached = Objective("ce", 0.5, cached=kl_reference.CachedKL.of(ref, examples))
    return _moved(model), live, cached


def _sums_and_grads(objective, model, batch):
    model.zero_grad()
    s = objective.sums(model, batch)
    s.objective.backward()
    return s, [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True])
def test_the_whole_vocabulary_cached_is_the_live_kl(packed):
    examples = _examples(10, seed=5)
    rows = pack(examples, max_len=40, seed=0) if packed else examples
    assert not packed or any(len(r.lengths) > 1 for r in rows)
    model, live, cached = _objectives(rows, k=64)
    batch = collate([rows[i] for i in (3, 0, 2)] if len(rows) > 3 else rows[::-1], pad_id=2)  # any order, padded
    a, ga = _sums_and_grads(live, model, batch)
    b, gb = _sums_and_grads(cached, model, batch)
    assert float(a.kl) > 1e-3 and float(b.kl) == pytest.approx(float(a.kl), rel=1e-4)
    assert float(b.objective.detach()) == pytest.approx(float(a.objective.detach()), rel=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-6)


def test_a_coarse_reference_is_a_lower_bound_and_zero_at_theta0():
    examples = _examples(8, seed=6)
    model, live, cached = _objectives(examples, k=4)
    batch = collate(examples[:5], pad_id=2)
    exact, coarse = float(live.sums(model, batch).kl), float(cached.sums(model, batch).kl)
    assert 0 < coarse < exact
    at_theta0 = Objective("ce", 0.5, cached=cached.cached)
    assert abs(at_theta0.sums(live.theta0, batch).kl) < 1e-5


def test_every_row_is_found_by_content():
    examples = _examples(6, seed=7)
    keys = [kl_reference.row_key(e.input_ids, drift.scored_positions(e)) for e in examples]
    assert kl_reference.batch_keys(collate(examples, pad_id=2)) == keys  # padding is not part of a row's key
    assert kl_reference.batch_keys(collate(examples[::-1], pad_id=0)) == keys[::-1]
    assert len(set(keys)) == len(keys)


def _run(tiny_dir, data, out, **extra):
    return run_training(load_config(None, tiny_overrides(tiny_dir, data, out, **extra)))


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_a_cached_run_is_the_live_run_and_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kl_reference, "K", 10_000)  # more than the tiny vocabulary: the exact KL
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    extra = {"train.max_steps": 4, "train.save_interval": 2, "loss.type": "dft", "loss.kl_to_theta0": 0.5}
    _run(tiny_dir, data, tmp_path / "live", **extra)
    capsys.readouterr()
    _run(tiny_dir, data, tmp_path / "cached", **extra, **{"loss.kl_reference": "cached"})
    out = capsys.readouterr().out
    assert "θ0's top-k, kept before step 1" in out and "frozen θ0 copy" not in out
    live, cached = _records(tmp_path / "live"), _records(tmp_path / "cached")
    assert cached[0]["kl_to_theta0"] == pytest.approx(0, abs=1e-6) and cached[-1]["kl_to_theta0"] > 1e-4
    for a, b in zip(live, cached):
        assert b["kl_to_theta0"] == pytest.approx(a["kl_to_theta0"], rel=1e-3, abs=1e-7)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    saved, final = tmp_path / "cached" / kl_reference.FILE, tmp_path / "cached" / "final" / "model.safetensors"
    first = load_file(str(final))
    resume = str(tmp_path / "cached" / "checkpoints" / "step-0000002")
    for damaged in (False, True):  # damaged: θ0 is scored again, in one line, before the checkpoint loads
        if damaged:
            saved.write_bytes(saved.read_bytes()[:100])
        _run(tiny_dir, data, tmp_path / "cached", **extra, **{"loss.kl_reference": "cached", "train.resume": resume})
        out = capsys.readouterr().out
        assert ("scoring θ0 again" in out) == damaged and ("read back" in out) == (not damaged)
        assert all(torch.equal(first[k], v) for k, v in load_file(str(final)).items())
        assert [r["kl_to_theta0"] for r in _records(tmp_path / "cached")] == [r["kl_to_theta0"] for r in cached]


def test_kl_reference_errors_name_the_key():
    with pytest.raises(UserError, match=r"loss.kl_reference: 'disk' is not one of live, cached"):
        load_config(None, ["loss.kl_reference=disk"])


def test_the_memory_estimate_drops_the_theta0_copy_when_cached():
    from fulltune.memory.estimate import TrainSetup, estimate
    from fulltune.memory.spec import load_spec

    spec = load_spec("smollm2-135m")
    live = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, kl_theta0=True))
    cached = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, kl_theta0=True, kl_live=False))
    assert live.get("θ0 model (KL)") == 4 * spec.n_params and cached.get("θ0 model (KL)") == 0
    assert cached.get("logits + loss") == live.get("logits + loss")  # the KL's tensors at each target stay
