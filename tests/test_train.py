import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.config import ModelConfig, OptimConfig, load_config
from fulltune.data.formats import Example
from fulltune.data.loader import collate
from fulltune.loss import loss_sum
from fulltune.model import load_theta0
from fulltune.optim.param_groups import build_optimizer
from fulltune.train import run_training, train_step

NOCAST = contextlib.nullcontext


def _examples(n, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(2, length - 1, (1,), generator=g))
        out.append(Example(ids, [0] * prompt + [1] * (length - prompt)))
    return out


def _twin_models(vocab=64):
    a = make_model(vocab, layers=2)
    b = make_model(vocab, layers=2)
    b.load_state_dict(a.state_dict())
    return a, b


def test_grad_accumulation_2x4_equals_8x1():
    # float64: Adam's m/sqrt(v) turns float32 summation-order noise on near-zero gradients into
    # visible update differences; in double, any real normalisation error stands out.
    a, b = (m.double() for m in _twin_models())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    ex = _examples(8)
    big = [collate(ex, pad_id=2)]
    small = [collate(ex[i : i + 2], pad_id=2) for i in range(0, 8, 2)]
    ra, rb = train_step(a, opt_a, big, NOCAST, grad_clip=1.0), train_step(b, opt_b, small, NOCAST, grad_clip=1.0)
    (loss_a, norm_a), (loss_b, norm_b) = (ra.loss, ra.grad_norm), (rb.loss, rb.grad_norm)
    assert ra.applied and rb.applied
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6)
    assert norm_a == pytest.approx(norm_b, rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    # A per-micro-batch mean (the classic bug) would differ: unequal target counts per micro-batch.
    counts = [int((m["labels"] != -100).sum()) for m in small]
    assert len(set(counts)) > 1


def test_every_parameter_changes_after_one_step():
    model = make_model(64, layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    train_step(model, opt, [collate(_examples(4), pad_id=2)], NOCAST, grad_clip=1.0)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_prompt_tokens_contribute_nothing_to_the_loss():
    model = make_model(64, layers=2)
    ex = _examples(3)
    batch = collate(ex, pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = 0.0
    for row, e in enumerate(ex):
        for t in range(1, len(e.input_ids)):
            if e.target_mask[t]:
                total -= F.log_softmax(logits[row, t - 1].double(), -1)[e.input_ids[t]]
    assert float(loss_sum(model, batch).detach()) == pytest.approx(float(total), rel=1e-5)
    # Marking position 0 as a target changes nothing: no token predicts it.
    first = [Example(e.input_ids, [1] + e.target_mask[1:]) for e in ex]
    assert float(loss_sum(model, collate(first, pad_id=2)).detach()) == pytest.approx(float(total), rel=1e-6)
    # Un-masking one prompt token adds exactly its own -log p: prompt tokens are otherwise absent.
    e0 = ex[0]
    t = e0.target_mask.index(1) - 1
    assert t >= 1
    opened = [Example(e0.input_ids, e0.target_mask[:t] + [1] + e0.target_mask[t + 1 :])] + ex[1:]
    extra = -F.log_softmax(logits[0, t - 1].double(), -1)[e0.input_ids[t]]
    assert float(loss_sum(model, collate(opened, pad_id=2)).detach()) == pytest.approx(float(total + extra), rel=1e-5)


def test_theta0_in_memory_equals_the_file_bit_for_bit(tiny_dir):
    model, _, _ = load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor), name
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_missing_weights_are_an_error(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from fulltune.errors import UserError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing keys: model.layers.0.mlp.up_proj.weight"):
        load_theta0(ModelConfig(path=str(broken)), verbose=False)


def _run(tiny_dir, data, out, **extra):
    return run_training(load_config(None, tiny_overrides(tiny_dir, data, out, **extra)))


def test_final_reloads_with_identical_logits(tiny_dir, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _run(tiny_dir, chat_file, tmp_path / "run", **{"train.max_steps": 2})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    x = torch.tensor([tok("the movie was great")["input_ids"]])
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(run.model(x).logits, reloaded(x).logits)
    assert reloaded.generate(x, max_new_tokens=3, do_sample=False).shape[1] == x.shape[1] + 3
    # It is the fine-tuned model, not θ0.
    theta0 = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(theta0.model.embed_tokens.weight, reloaded.model.embed_tokens.weight)


def test_two_steps_resume_two_steps_equals_four_straight(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(40))
    extra = {
        "train.max_steps": 4,
        "train.grad_accum_steps": 2,
        "optim.weight_decay": 0.1,
        "optim.layer_lr_decay": 1.5,
        "train.save_interval": 2,
    }
    _run(tiny_dir, data, tmp_path / "straight", **extra)
    resumed_from = tmp_path / "straight" / "checkpoints" / "step-0000002"
    _run(tiny_dir, data, tmp_path / "resumed", **extra, **{"train.resume": str(resumed_from)})
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda p: [
        json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines() if "loss" in line
    ]
    assert losses(tmp_path / "straight")[2:] == losses(tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["sampler"]["pos"] == 32 and state["step"] == 4  # 4 steps × 2 × 4 examples, no replay


def test_resume_auto_after_interruption_continues(tiny_dir, chat_file, tmp_path):
    extra = {"train.max_steps": 4, "train.save_interval": 2}
    _run(tiny_dir, chat_file, tmp_path / "a", **extra)
    # Simulate a crash after step 2: drop the last checkpoint and the final export.
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "a" / "final")
    before = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000002" / "model.safetensors"))
    run = _run(tiny_dir, chat_file, tmp_path / "a", **extra, **{"train.resume": "auto"})
    assert run.state.step == 4
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert not torch.equal(before["model.norm.weight"], run.model.model.norm.weight)


def test_task_accuracy_before_and_after_in_results(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(32))
    test = write_jsonl(tmp_path / "t.jsonl", sentiment_records(10, seed=1))
    _run(
        tiny_dir,
        data,
        tmp_path / "r",
        **{
            "train.epochs": 2,
            "eval.task_file": str(test),
            "eval.labels": "[positive, negative]",
            "data.val_fraction": 0.1,
        },
    )
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    for key in ("task_accuracy_theta0", "task_accuracy_final"):
        r = results[key]
        assert r["n"] == 10 and r["accuracy"] == r["correct"] / 10
    assert results["steps"] == 2 * 8 and results["data"]["n_val"] == 3 and results["final_val_loss"] > 0


def test_same_seed_same_run_other_seed_other_order(tiny_dir, chat_file, tmp_path):
    def losses(name, seed):
        _run(tiny_dir, chat_file, tmp_path / name, **{"train.max_steps": 3, "train.seed": seed})
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    first = losses("a", 0)
    assert losses("b", 0) == first
    assert losses("c", 1) != first
