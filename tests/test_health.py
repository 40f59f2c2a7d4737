"""Non-finite steps never reach the weights or a checkpoint; a diverging run is flagged."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import QUICKSTART, make_model, tiny_overrides
from safetensors.torch import load_file

from fulltune import checkpoint
from fulltune.cli import main
from fulltune.errors import UserError
from fulltune.train import train_step


def _strict(line: str) -> dict:
    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}: not JSON")

    return json.loads(line, parse_constant=refuse)


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_a_nonfinite_gradient_never_reaches_the_weights():
    model = make_model(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hook = model.model.layers[1].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    r = train_step(model, optimizer, [_batch(64)], contextlib.nullcontext, grad_clip=1.0)
    loss, norm = r.loss, r.grad_norm
    assert not r.applied and not r.finite
    assert loss == pytest.approx(loss) and loss > 0 and norm != norm  # the loss is finite, the norm NaN
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimizer.state == {} and all(p.grad is None for p in model.parameters())
    hook.remove()
    train_step(model, optimizer, [_batch(64)], contextlib.nullcontext, grad_clip=1.0)  # a good step is applied
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, before["model.layers.1.mlp.up_proj.weight"])


def test_nonfinite_steps_in_a_row_stop_the_run_and_every_checkpoint_is_finite(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    args = [
        "train",
        QUICKSTART,
        *tiny_overrides(
            tiny_dir,
            chat_file,
            out,
            **{
                "train.max_steps": 8,
                "optim.lr": 100,
                "optim.grad_clip": 1.0,
                "train.save_interval": 1,
                "train.keep_checkpoints": 10,
            },
        ),
        "eval.task_file=",
        "data.val_fraction=0",
    ]
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    last = out / "checkpoints" / "step-0000003"
    assert captured.err.strip().splitlines()[-1] == (
        f"fulltune: error: step 4: 3 non-finite steps in a row (train.max_bad_steps 3); stopped, the last good "
        f"checkpoint is {last}. Lower optim.lr, set optim.grad_clip, or check the data"
    )
    assert "step 2: loss" in captured.out and "not finite, the update was skipped (1 in a row" in captured.out
    records = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("skipped", False)) for r in records] == [(1, False), (2, True), (3, True)]
    assert records[1]["grad_norm"] is None
    for path in checkpoint.list_checkpoints(out):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(path / "model.safetensors").values())
    step1 = load_file(out / "checkpoints" / "step-0000001" / "model.safetensors")
    assert all(torch.equal(t, step1[k]) for k, t in load_file(last / "model.safetensors").items())  # skipped: unchanged
    assert not (out / "final").exists()


def test_a_diverging_run_is_flagged(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    args = [
        "train",
        QUICKSTART,
        *tiny_overrides(tiny_dir, chat_file, out, **{"train.max_steps": 8, "optim.lr": 10, "optim.grad_clip": 1.0}),
        "eval.task_file=",
        "data.val_fraction=0",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("[train] warning: diverging since step 2: loss") == 1
    assert "[train] warning: this run diverged: diverging since step 2" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["diverged"]["step"] == 4 and results["diverged"]["reference"]["step"] == 1
    assert results["diverged"]["loss"] > 3 * results["diverged"]["reference"]["loss"]
    assert results["skipped_steps"] == 0


def test_a_calm_run_is_not_flagged(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    args = [
        "train",
        QUICKSTART,
        *tiny_overrides(tiny_dir, chat_file, out, **{"train.max_steps": 6}),
        "eval.task_file=",
        "data.val_fraction=0",
    ]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["diverged"] is None and results["skipped_steps"] == 0


def test_nonfinite_weights_are_never_written(tmp_path):
    model = make_model(64)
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    with pytest.raises(UserError, match="the weights hold NaN or inf; the previous checkpoint is kept"):
        checkpoint.export_hf(model, None, tmp_path / "final")
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match=f"checkpoint {tmp_path / 'checkpoints' / 'step-0000005'}: not written"):
        checkpoint.save_checkpoint(
            tmp_path, step=5, model=model, optimizer=torch.optim.AdamW(model.parameters()),
            trainer_state={"step": 5}, keep=2,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
