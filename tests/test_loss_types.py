"""Loss mitigations against forgetting: DFT (loss.type dft) and β·KL(p_θ0 ‖ p_θ) (loss.kl_to_theta0),
each checked against a hand computation on full logits; ce and β = 0 are the old path bit for bit."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file
from test_train import _examples

from fulltune.config import LossConfig, OptimConfig, load_config
from fulltune.data.loader import IGNORE, collate
from fulltune.errors import UserError
from fulltune.loss import Objective, loss_sum, objective_for_run
from fulltune.memory.estimate import TrainSetup, estimate
from fulltune.memory.spec import load_spec
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import run_training, train_step

NOCAST = contextlib.nullcontext


def _batch(n=6, seed=0):
    return collate(_examples(n, seed=seed), pad_id=2)


def _full_logits_at_targets(model, batch):
    """Hand path: the model's whole logits (no pre-hook), shifted, at the target positions; targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    return logits[keep].float(), labels[keep]


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _hand_kl(model, theta0, batch):
    """Σ over the target positions of KL(p_θ0 ‖ p_θ) = Σ_v p0·(log p0 − log p), from full logits."""
    logits, _ = _full_logits_at_targets(model, batch)
    with torch.no_grad():
        logits0, _ = _full_logits_at_targets(theta0, batch)
    logp0, logq = F.log_softmax(logits0, -1), F.log_softmax(logits, -1)
    return (logp0.exp() * (logp0 - logq)).sum()


# ---------------------------------------------------------------- DFT


def test_dft_loss_and_gradient_equal_a_hand_computation():
    model, batch = make_model(64, layers=2, seed=3), _batch()
    s = Objective("dft").sums(model, batch)
    s.objective.backward()
    ours = _grads(model)
    model.zero_grad()
    logits, targets = _full_logits_at_targets(model, batch)
    logp = F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    hand = -(logp.exp().detach() * logp).sum()  # −sg(p_t)·log p_t, summed over the target tokens
    hand.backward(retain_graph=True)
    assert float(s.objective.detach()) == pytest.approx(float(hand.detach()), rel=1e-5)
    assert float(s.dft) == pytest.approx(float(hand.detach()), rel=1e-5)
    assert float(s.ce) == pytest.approx(float(-logp.detach().sum()), rel=1e-5)
    for a, b in zip(ours, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Not the CE gradient, and not the gradient of p·log p without the stop: the weight matters, detached.
    model.zero_grad()
    (-(logp.exp() * logp).sum()).backward()
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ours, _grads(model)))
    model.zero_grad()
    loss_sum(model, batch).backward()
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ours, _grads(model)))


def test_dft_step_is_token_normalised_and_reports_ce_as_the_loss():
    model, batch = make_model(64, layers=2, seed=4), _batch(8, seed=1)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    logits, targets = _full_logits_at_targets(model, batch)
    with torch.no_grad():
        logp = F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    r = train_step(model, opt, [batch], NOCAST, grad_clip=1.0, objective=Objective("dft"))
    assert r.loss == pytest.approx(float(-logp.sum()) / n, rel=1e-5)  # "loss" stays the token CE
    assert r.dft_loss == pytest.approx(float(-(logp.exp() * logp).sum()) / n, rel=1e-5) and r.kl is None


# ---------------------------------------------------------------- ce and β = 0: the old path


def _old_step(model, optimizer, micro_batches):
    """train_step as it was before loss.type: Σ loss_sum / N backpropagated, clip 1, step."""
    n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        s = loss_sum(model, b)
        (s * 1 / n).backward()
        total += s.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / n


def test_ce_and_beta_zero_are_the_old_step_bit_for_bit():
    objective = objective_for_run(LossConfig(type="ce", kl_to_theta0=0.0), make_model(64, layers=2))
    assert objective.theta0 is None and objective.theta0_nbytes == 0  # β = 0 builds no θ0 copy
    models = [make_model(64, layers=2, seed=5) for _ in range(3)]
    opts = [build_optimizer(m, OptimConfig(lr=1e-2)) for m in models]
    for step in range(3):
        batches = [_batch(3, seed=10 + step), _batch(2, seed=20 + step)]
        old = _old_step(models[0], opts[0], batches)
        default = train_step(models[1], opts[1], batches, NOCAST, grad_clip=1.0)
        explicit = train_step(models[2], opts[2], batches, NOCAST, grad_clip=1.0, objective=objective)
        assert old == default.loss == explicit.loss  # exactly
        assert default.dft_loss is None and default.kl is None
    for a, b, c in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- KL(θ0 ‖ θ)


def test_kl_is_zero_at_theta0_and_the_hand_kl_after_an_update():
    model, batch = make_model(64, layers=2, seed=6), _batch(6, seed=2)
    objective = objective_for_run(LossConfig(kl_to_theta0=0.5), model)
    theta0 = objective.theta0
    assert not theta0.training and not any(p.requires_grad for p in theta0.parameters())
    assert objective.theta0_nbytes == sum(p.numel() * 4 for p in model.parameters())
    assert abs(objective.sums(model, batch).kl) < 1e-6
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    first = train_step(model, opt, [batch], NOCAST, grad_clip=0.0, objective=objective)
    assert abs(first.kl) < 1e-6  # measured before the update: θ = θ0
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), theta0.parameters()))
    s = objective.sums(model, batch)
    s.objective.backward()
    ours = _grads(model)
    model.zero_grad()
    logits, targets = _full_logits_at_targets(model, batch)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    hand_kl = _hand_kl(model, theta0, batch)
    (ce + 0.5 * hand_kl).backward()
    assert float(s.kl) > 1e-4 and float(s.kl) == pytest.approx(float(hand_kl.detach()), rel=1e-5)
    assert float(s.objective.detach()) == pytest.approx(float((ce + 0.5 * hand_kl).detach()), rel=1e-5)
    for a, b in zip(ours, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The reverse KL(θ ‖ θ0) is another number: the direction is tested, not only the size.
    logits0, _ = _full_logits_at_targets(theta0, batch)
    logq, logp0 = F.log_softmax(logits.detach(), -1), F.log_softmax(logits0, -1)
    assert float((logq.exp() * (logq - logp0)).sum()) != pytest.approx(float(s.kl), rel=1e-3)


def test_kl_works_with_the_step_in_backward():
    """train.memory lean (optimizer_in_backward): the same update as the ordinary step with the KL on."""
    a, b = make_model(64, layers=2, seed=7), make_model(64, layers=2, seed=7)
    objectives = [objective_for_run(LossConfig(type="dft", kl_to_theta0=1.0), m) for m in (a, b)]
    cfg = OptimConfig(lr=1e-2, grad_clip=0.0)
    ordinary, fused = build_optimizer(a, cfg), build_optimizer(b, cfg, in_backward=True)
    for step in range(3):
        batch = [_batch(4, seed=30 + step)]
        ra = train_step(a, ordinary, batch, NOCAST, grad_clip=0.0, objective=objectives[0])
        rb = train_step(b, fused, batch, NOCAST, grad_clip=0.0, objective=objectives[1])
        assert ra.kl == pytest.approx(rb.kl, rel=1e-5, abs=1e-9) and ra.loss == pytest.approx(rb.loss, rel=1e-6)
    assert ra.kl > 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def _train(beta, optim: OptimConfig, steps=20):
    """(‖θ − θ0‖, the mean KL(θ0 ‖ θ) per target token on the batch) after `steps` steps on one batch."""
    model = make_model(64, layers=2, seed=8)
    objective = objective_for_run(LossConfig(kl_to_theta0=beta), model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt, batch = build_optimizer(model, optim), _batch(8, seed=3)
    for _ in range(steps):
        train_step(model, opt, [batch], NOCAST, grad_clip=0.0, objective=objective)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        kl = float(_hand_kl(model, objective.theta0 or make_model(64, layers=2, seed=8), batch)) / n
    return sum(float(((p.detach() - p0) ** 2).sum()) for p, p0 in zip(model.parameters(), theta0)) ** 0.5, kl


def test_a_large_beta_ends_closer_to_theta0():
    # SGD shows the pull in weight space directly (measured: ‖θ − θ0‖ 3.92 at β = 0, 1.86 at β = 5).
    sgd = [_train(beta, OptimConfig(name="sgd", lr=0.3)) for beta in (0.0, 1.0, 5.0)]
    assert sgd[0][0] > sgd[1][0] > sgd[2][0] and sgd[2][0] < 0.6 * sgd[0][0], sgd
    assert sgd[0][1] > sgd[1][1] > sgd[2][1], sgd
    # AdamW normalises each step's size, so the weights move about as far, but the function stays near θ0's.
    free, held = _train(0.0, OptimConfig(lr=3e-2)), _train(20.0, OptimConfig(lr=3e-2))
    assert held[0] < free[0] and held[1] < 0.5 * free[1], (held, free)


# ---------------------------------------------------------------- runs: resume, config, memory


def _run(tiny_dir, data, out, **extra):
    return run_training(load_config(None, tiny_overrides(tiny_dir, data, out, **extra)))


def test_an_asft_run_resumes_exactly(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    extra = {"train.max_steps": 4, "train.save_interval": 2, "loss.type": "dft", "loss.kl_to_theta0": 0.5}
    _run(tiny_dir, data, tmp_path / "straight", **extra)
    resume = str(tmp_path / "straight" / "checkpoints" / "step-0000002")
    _run(tiny_dir, data, tmp_path / "resumed", **extra, **{"train.resume": resume})
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [
        [json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for r in ("straight", "resumed")
    ]
    assert [r["step"] for r in records[0]] == [1, 2, 3, 4] and [r["step"] for r in records[1]] == [3, 4]
    for key in ("loss", "dft_loss", "kl_to_theta0"):  # the resumed steps are the same steps
        assert [r[key] for r in records[0][2:]] == [r[key] for r in records[1]]
    assert abs(records[0][0]["kl_to_theta0"]) < 1e-6 and all(r["kl_to_theta0"] > 0 for r in records[0][1:])
    assert all(0 < r["dft_loss"] < r["loss"] for r in records[0])  # −p·log p < −log p for 0 < p < 1


def test_loss_config_errors_name_the_key():
    with pytest.raises(UserError, match=r"loss.type: 'foo' is not one of ce, dft"):
        load_config(None, ["loss.type=foo"])
    with pytest.raises(UserError, match=r"loss.kl_to_theta0: -1.0 must be >= 0.0"):
        load_config(None, ["loss.kl_to_theta0=-1"])
    cfg = load_config(None, ["loss.type=dft", "loss.kl_to_theta0=0.1"])
    assert (cfg.loss.type, cfg.loss.kl_to_theta0) == ("dft", 0.1)


def test_kl_is_refused_under_fsdp2_in_one_line():
    from fulltune.run_setup import _refuse_under_fsdp2

    _refuse_under_fsdp2(load_config(None, ["loss.type=dft"]))  # DFT alone shards like CE
    with pytest.raises(
        UserError,
        match=r"^loss.kl_to_theta0: its frozen θ0 copy is not sharded with FSDP2 \(torchrun\), and its cached",
    ):
        _refuse_under_fsdp2(load_config(None, ["loss.kl_to_theta0=0.1"]))


def test_memory_estimate_counts_the_kl_theta0_model():
    spec = load_spec("smollm2-135m")
    n, v = spec.n_params, spec.vocab
    plain = estimate(spec, TrainSetup(micro_batch=1, seq_len=128))
    kl = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, kl_theta0=True))
    bf16 = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, precision="bf16", kl_theta0=True))
    assert plain.get("θ0 model (KL)") == 0 and kl.get("θ0 model (KL)") == 4 * n and bf16.get("θ0 model (KL)") == 2 * n
    assert kl.get("logits + loss") - plain.get("logits + loss") == pytest.approx(128 * v * 8)
    assert kl.peak - plain.peak == pytest.approx(4 * n + 128 * v * 8)
