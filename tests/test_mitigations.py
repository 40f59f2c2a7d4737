"""Forgetting mitigations: data mixing, L2-SP, EWC (Fisher), decay toward θ0, WiSE-FT interpolation."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, make_model, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.anchors import Anchor, estimate_fisher, normalise
from fulltune.cli import main
from fulltune.commands.interpolate import blend, endpoint_weights
from fulltune.config import OptimConfig, load_config
from fulltune.data.formats import Example
from fulltune.data.loader import StepSampler, collate
from fulltune.data.mixture import MixedSampler
from fulltune.errors import UserError
from fulltune.memory.estimate import TrainSetup, estimate
from fulltune.memory.spec import load_spec
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import run_training, train_step

NOCAST = contextlib.nullcontext


def _examples(n, vocab=64, seed=0, all_targets=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = 1 if all_targets else int(torch.randint(2, length - 1, (1,), generator=g))
        out.append(Example(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def _general_file(path, n=30, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = [
        {"text": " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (12,), generator=g))} for _ in range(n)
    ]
    return write_jsonl(path, rows)


def _run(tiny_dir, data, out, **extra):
    return run_training(load_config(None, tiny_overrides(tiny_dir, data, out, **extra)))


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


# ---------------------------------------------------------------- data mixing


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3])
def test_mixing_share_matches_ratio_and_task_order_is_unchanged(ratio):
    plain = StepSampler(50, 4, 2, seed=3)
    mixed = MixedSampler(StepSampler(50, 4, 2, seed=3), n_general=17, ratio=ratio, seed=3)
    task_total = general_total = 0
    for _ in range(300):
        expected_task = [i for b in plain.next_step() for i in b]
        step = mixed.next_step()
        assert all(len(b) <= 4 for b in step)  # never above the micro-batch size
        flat = [i for b in step for i in b]
        assert [i for i in flat if i < 50] == expected_task  # the task's order is the task-only order
        general = [i for i in flat if i >= 50]
        assert all(50 <= i < 67 for i in general)
        task_total, general_total = task_total + len(expected_task), general_total + len(general)
        share = general_total / (task_total + general_total)
        assert abs(general_total - round(task_total * ratio / (1 - ratio))) == 0
    assert share == pytest.approx(ratio, abs=1 / (task_total + general_total) + 1e-9)


def test_mixing_sampler_is_identical_after_resume():
    a = MixedSampler(StepSampler(50, 4, 1, seed=1), 17, 0.1, seed=1)
    for _ in range(37):
        a.next_step()
    state = json.loads(json.dumps(a.state_dict()))  # as saved in trainer_state.json
    b = MixedSampler(StepSampler(50, 4, 1, seed=1), 17, 0.1, seed=1)
    b.load_state_dict(state)
    assert [a.next_step() for _ in range(60)] == [b.next_step() for _ in range(60)]
    c = MixedSampler(StepSampler(50, 4, 1, seed=1), 17, 0.2, seed=1)
    with pytest.raises(UserError, match="mix_ratio changed"):
        c.load_state_dict(state)


def test_mixed_run_uses_general_data_and_resumes_bit_for_bit(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(40))
    general = _general_file(tmp_path / "g.jsonl")
    extra = {
        "train.max_steps": 4,
        "train.save_interval": 2,
        "data.general": f"[{general}]",
        "data.mix_ratio": 0.25,
        "anchor.method": "l2sp",
        "anchor.lam": 0.5,
        "optim.weight_decay": 0.1,
        "optim.decay_toward": "theta0",
    }
    _run(tiny_dir, data, tmp_path / "straight", **extra)
    _run(
        tiny_dir,
        data,
        tmp_path / "resumed",
        **extra,
        **{"train.resume": str(tmp_path / "straight" / "checkpoints" / "step-0000002")},
    )
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    mixing = results["mixing"]
    assert mixing["task_sequences"] == 16 and mixing["general_sequences"] == round(16 * 0.25 / 0.75)
    assert 0 < mixing["general_target_token_share"] < 1
    lines = [
        json.loads(line)
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert all(r["penalty"] >= 0 and r["theta0_distance"] > 0 for r in lines)
    # Mixing changes the run: the same config without general data ends elsewhere.
    _run(
        tiny_dir,
        data,
        tmp_path / "task-only",
        **{k: v for k, v in extra.items() if k not in ("data.general", "data.mix_ratio")},
    )
    c = _weights(tmp_path / "task-only")
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- L2-SP / EWC


def test_lambda_zero_is_exactly_the_unregularised_run(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    _run(tiny_dir, data, tmp_path / "plain", **{"train.max_steps": 3})
    _run(tiny_dir, data, tmp_path / "l2sp0", **{"train.max_steps": 3, "anchor.method": "l2sp", "anchor.lam": 0})
    _run(tiny_dir, data, tmp_path / "l2sp1", **{"train.max_steps": 3, "anchor.method": "l2sp", "anchor.lam": 1.0})
    a, b, c = _weights(tmp_path / "plain"), _weights(tmp_path / "l2sp0"), _weights(tmp_path / "l2sp1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and λ > 0 does change it (after step 1)


def _train_toward(lam, fisher_fn=None, steps=6):
    model = make_model(64, layers=2, seed=1)
    fisher = fisher_fn(model) if fisher_fn else None
    anchor = Anchor(model, lam, fisher)
    opt = build_optimizer(model, OptimConfig(lr=3e-2))
    batch = [collate(_examples(8, seed=2), pad_id=2)]
    for _ in range(steps):
        train_step(model, opt, batch, NOCAST, grad_clip=0.0, anchor=anchor)
    return anchor.distance()


def test_l2sp_ends_closer_to_theta0_as_lambda_grows():
    distances = [_train_toward(lam) for lam in (0.0, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0]


def test_penalty_gradient_equals_autograd_of_the_penalty():
    model = make_model(64, layers=1, seed=3)
    fisher = [torch.rand_like(p) for p in model.parameters()]
    anchor = Anchor(model, 0.7, fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    params = list(model.parameters())
    penalty = 0.5 * 0.7 * sum((f * (p - p0) ** 2).sum() for p, p0, f in zip(params, anchor.theta0, fisher))
    expected = torch.autograd.grad(penalty, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    value = anchor.add_penalty_grad()
    assert value == pytest.approx(float(penalty.detach()), rel=1e-5)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)


def test_fisher_is_the_mean_of_squared_per_example_gradients():
    model = make_model(64, layers=2, seed=4)
    examples = _examples(5, seed=6, all_targets=True)
    fisher = estimate_fisher(model, examples, pad_id=2, autocast=NOCAST)
    # Directly: per example, the mean token NLL from full logits and F.cross_entropy, .backward(), grad².
    direct = [torch.zeros_like(p) for p in model.parameters()]
    for ex in examples:
        model.zero_grad()
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(ex.input_ids[1:])
        keep = torch.tensor(ex.target_mask[1:], dtype=torch.bool)
        F.cross_entropy(logits[keep], targets[keep]).backward()
        for d, p in zip(direct, model.parameters()):
            d += p.grad**2
    for f, d in zip(fisher, direct):
        torch.testing.assert_close(f, d / len(examples), rtol=1e-4, atol=1e-10)
    norm = normalise(fisher)
    assert float(sum(f.sum() for f in norm)) / sum(f.numel() for f in norm) == pytest.approx(1.0, rel=1e-5)


def test_ewc_pulls_harder_where_fisher_is_large():
    # EWC with F = 1 everywhere is L2-SP; weighting one tensor ×100 holds that tensor closer to θ0.
    def ones(model):
        return [torch.ones_like(p) for p in model.parameters()]

    def heavy_some(model):  # F = 100 on the embedding and the 64-row MLP matrices, 1 elsewhere
        return [torch.full_like(p, 100.0 if p.ndim == 2 and p.shape[0] == 64 else 1.0) for p in model.parameters()]

    assert _train_toward(5.0, ones) == pytest.approx(_train_toward(5.0), rel=1e-6)
    assert _train_toward(5.0, heavy_some) < _train_toward(5.0, ones)


def test_ewc_run_caches_the_fisher_and_reuses_it(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    general = _general_file(tmp_path / "g.jsonl")
    extra = {
        "train.max_steps": 2,
        "data.general": f"[{general}]",
        "anchor.method": "ewc",
        "anchor.lam": 2.0,
        "anchor.fisher_batches": 2,
    }
    _run(tiny_dir, data, tmp_path / "r", **extra)
    assert "computed, cached in" in capsys.readouterr().out
    cached = load_file(str(tmp_path / "r" / "fisher.safetensors"))
    assert all(float(f.min()) >= 0 for f in cached.values()) and sum(float(f.sum()) for f in cached.values()) > 0
    first = _weights(tmp_path / "r")
    _run(tiny_dir, data, tmp_path / "r", **extra, **{"train.resume": "auto"})  # resuming: the cache is read
    assert "reused" in capsys.readouterr().out
    # A fresh start (overwrite) computes it anew: the same Fisher from the same θ0, the same run.
    _run(tiny_dir, data, tmp_path / "r", **extra, **{"train.overwrite": "true"})
    assert "computed, cached in" in capsys.readouterr().out
    second = _weights(tmp_path / "r")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_decay_toward_theta0_is_the_decoupled_pull():
    model = make_model(64, layers=1, seed=5)
    anchor = Anchor(model)
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5, decay_toward="theta0"))
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # AdamW's own decay is off
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    anchor.decay_toward_theta0(opt)
    for p, b, p0 in zip(model.parameters(), before, anchor.theta0):
        expected = b - 0.1 * 0.5 * (b - p0) if p.ndim >= 2 else b  # no decay on norms and biases
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_missing_general_file_is_one_clear_error_before_the_model_loads(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(8))
    missing = tmp_path / "nope.jsonl"
    args = ["train", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    code = main(
        args + tiny_overrides(tiny_dir, data, tmp_path / "r", **{"data.general": f"[{missing}]", "data.mix_ratio": 0.1})
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"data file not found: {missing}" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_mitigation_config_errors_name_the_key():
    with pytest.raises(UserError) as err:
        load_config(None, ["data.mix_ratio=0.1", "anchor.method=ewc", "optim.decay_toward=theta0"])
    text = str(err.value)
    assert "data.mix_ratio: mixing needs general data" in text
    assert "anchor.method: ewc estimates its Fisher on data.general" in text
    assert "optim.decay_toward: theta0 needs optim.weight_decay > 0" in text
    with pytest.raises(UserError, match="anchor.lam: 1.0 has no effect"):
        load_config(None, ["anchor.lam=1"])


def test_memory_estimate_counts_the_anchor():
    spec = load_spec("smollm2-135m")
    n = spec.n_params
    plain = estimate(spec, TrainSetup(micro_batch=1, seq_len=128))
    l2sp = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, anchor="l2sp"))
    ewc = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, anchor="ewc"))
    assert l2sp.get("θ0 anchor") == 4 * n and ewc.get("θ0 anchor") == 8 * n
    assert l2sp.peak - plain.peak == pytest.approx(4 * n) and ewc.peak - plain.peak == pytest.approx(8 * n)
    zero3 = estimate(spec, TrainSetup(micro_batch=1, seq_len=128, anchor="ewc", gpus=4, zero_stage=3))
    assert zero3.get("θ0 anchor") == pytest.approx(8 * n / 4)


# ---------------------------------------------------------------- WiSE-FT


def test_interpolation_endpoints_reproduce_the_models():
    a, b = make_model(64, layers=2, seed=1), make_model(64, layers=2, seed=2)
    theta0, ft = endpoint_weights(a, b)
    model = make_model(64, layers=2, seed=9)
    blend(model, theta0, ft, 0.0)
    assert all(torch.equal(p, theta0[n]) for n, p in model.named_parameters())
    blend(model, theta0, ft, 1.0)
    assert all(torch.equal(p, ft[n]) for n, p in model.named_parameters())
    blend(model, theta0, ft, 0.25)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), 0.75 * theta0[n] + 0.25 * ft[n])


def test_interpolate_command_writes_table_and_plot(tiny_dir, tmp_path, capsys):
    from test_probes import MC

    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    task = write_jsonl(tmp_path / "task.jsonl", sentiment_records(6, seed=3))
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    run_training(
        load_config(
            None,
            tiny_overrides(
                tiny_dir,
                data,
                tmp_path / "r",
                **{
                    "train.max_steps": 3,
                    "eval.probes": f"[mc:{mc}]",
                    "eval.task_file": str(task),
                    "eval.labels": "[positive, negative]",
                },
            ),
        )
    )
    out = tmp_path / "wise"
    # Task and probe settings come from the run's config.yaml beside final/.
    assert (
        main(
            [
                "interpolate",
                str(tiny_dir),
                str(tmp_path / "r" / "final"),
                "--alphas",
                "0,0.5,1",
                "--out",
                str(out),
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    rows = json.loads((out / "interpolate.json").read_text())["rows"]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["task"]["accuracy"] == results["task_accuracy_theta0"]["accuracy"]
    assert rows[-1]["task"]["accuracy"] == results["task_accuracy_final"]["accuracy"]
    assert rows[0]["probes"]["mc"]["acc"] == results["probes_theta0"]["mc"]["acc"]
    assert rows[-1]["probes"]["mc"]["acc"] == results["probes_final"]["mc"]["acc"]
    assert (out / "interpolate.png").stat().st_size > 1000
    md = (out / "interpolate.md").read_text()
    assert "| 0.50 |" in md
    full = next(line for line in md.splitlines() if line.startswith("| 1.00 |"))
    mc = results["forgetting"]["probes"]["mc"]  # α = 1 is θ*: the run's own paired change, in the table
    assert f"({mc['change']:+.1f} [{mc['ci95'][0]:+.1f}, {mc['ci95'][1]:+.1f}])" in full
    capsys.readouterr()
    assert main(["interpolate"]) == 2  # a usage error: one line
    assert capsys.readouterr().err.startswith("fulltune: error: interpolate: the following arguments are required")
    assert main(["interpolate", str(tiny_dir), str(tmp_path / "r" / "final"), "--alphas", "0,2"]) == 2
    assert "every α must be in [0, 1]" in capsys.readouterr().err


def test_the_fisher_cache_is_keyed_on_the_tokens_and_read_only_when_resuming(tmp_path):
    from fulltune.anchors import cached_fisher, tokens_hash
    from fulltune.data.formats import Example

    calls = []

    def compute():
        calls.append(1)
        return [torch.full((2,), float(len(calls)))]

    seqs = [Example([5, 6, 7], [0, 1, 1]), Example([8, 9], [0, 1])]
    key = {"general": ["g.jsonl"], "tokens_sha256": tokens_hash(seqs)}
    path = tmp_path / "fisher.safetensors"
    assert cached_fisher(path, key, compute)[1] is False  # computed
    fisher, reused = cached_fisher(path, key, compute)
    assert reused and torch.equal(fisher[0], torch.full((2,), 1.0))
    assert cached_fisher(path, key, compute, reuse=False)[1] is False and len(calls) == 2  # a fresh start
    edited = [Example([5, 6, 4], [0, 1, 1]), seqs[1]]  # the same file name, other content
    assert tokens_hash(edited) != key["tokens_sha256"]
    assert cached_fisher(path, {**key, "tokens_sha256": tokens_hash(edited)}, compute)[1] is False and len(calls) == 3
