"""The drift monitor in a run: KL(θ0 ‖ θ) on the held-out task answers and on general text at every
validation point (metrics.jsonl, results.json), θ0's references kept in the run directory and read
back by a resumed run, and ~0 for a run that changes nothing."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import sentiment_records, tiny_overrides, write_jsonl
from safetensors import safe_open

from fulltune.config import ModelConfig, load_config
from fulltune.data.rundata import load_task_data, read_sources
from fulltune.evals import drift
from fulltune.model import load_theta0
from fulltune.train import run_training


def _overrides(tiny_dir, tmp_path, out, **extra):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(20))
    settings = {"train.max_steps": 4, "data.val_fraction": 0.2, "train.val_interval": 2, "eval.drift_general": 2}
    return tiny_overrides(tiny_dir, data, out, **{**settings, **extra})


def test_a_run_logs_its_drift_from_theta0(tiny_dir, tmp_path, capsys):
    out = tmp_path / "r"
    run_training(load_config(None, _overrides(tiny_dir, tmp_path, out)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drifted = [r for r in rows if "kl_task" in r]
    assert [r["step"] for r in drifted] == [2, 4]  # the validation point, and θ*'s at the end
    assert all(r["kl_task"] > 0 and r["kl_general"] > 0 for r in drifted)
    results = json.loads((out / "results.json").read_text())
    assert results["drift"] == {"kl_task": drifted[-1]["kl_task"], "kl_general": drifted[-1]["kl_general"]}
    with safe_open(str(drift.reference_path(out, "task")), "pt") as fh:
        key = json.loads(fh.metadata()["fulltune_drift"])["key"]
    task = drift.Theta0Reference.load(drift.reference_path(out, "task"), key)
    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]  # k: at most the vocabulary
    assert (
        task is not None
        and task.k == min(drift.DEFAULT_K, vocab)
        and task.positions == "target"
        and key["precision"] == "fp32"
    )
    assert int(task.scored.sum()) == task.n_positions > 0  # the held-out answers' tokens
    printed = capsys.readouterr().out
    assert "[drift] KL(θ0 ‖ θ) at every validation point on task " in printed
    assert "KL(θ0‖θ) on task answers" in printed


def test_a_run_that_changes_nothing_has_no_drift(tiny_dir, tmp_path):
    out = tmp_path / "null"
    run_training(load_config(None, _overrides(tiny_dir, tmp_path, out, **{"optim.lr": 1e-12})))
    results = json.loads((out / "results.json").read_text())
    assert results["drift"]["kl_task"] == pytest.approx(0, abs=1e-6)
    assert results["drift"]["kl_general"] == pytest.approx(0, abs=1e-6)


def test_a_resumed_run_reads_its_references_back(tiny_dir, tmp_path, capsys):
    cfg = load_config(None, _overrides(tiny_dir, tmp_path, tmp_path / "r"))
    model, tokenizer, _ = load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    data = load_task_data(cfg, tokenizer, read_sources(cfg))
    kwargs = dict(autocast=contextlib.nullcontext, precision="fp32")
    refs, unsaved = drift.references_for_run(cfg, tmp_path, model, data, resuming=False, **kwargs)
    assert set(refs) == {"task", "general"} and len(unsaved) == 2
    drift.save_references(unsaved)
    again, unsaved = drift.references_for_run(cfg, tmp_path, model, data, resuming=True, **kwargs)
    assert unsaved == [] and torch.equal(again["general"].top_logp, refs["general"].top_logp)
    drift.reference_path(tmp_path, "task").write_bytes(b"damaged")
    capsys.readouterr()
    again, unsaved = drift.references_for_run(cfg, tmp_path, model, data, resuming=True, **kwargs)
    assert [path.name for _, path, _ in unsaved] == ["drift-task.safetensors"]  # rebuilt from θ0, with one line
    assert capsys.readouterr().out.count("missing, damaged or from other settings; scoring θ0 again") == 1
    assert torch.equal(again["task"].top_ids, refs["task"].top_ids)


def test_one_forward_gives_the_validation_loss_and_the_task_drift(tiny_dir, tmp_path):
    """The task reference holds the validation sequences at their target positions: its NLL is the
    validation loss as `validation_loss` computes it (fp32, to rounding)."""
    from types import SimpleNamespace

    from fulltune.evals.during_run import validation_loss

    cfg = load_config(None, _overrides(tiny_dir, tmp_path, tmp_path / "r", **{"train.micro_batch_size": 3}))
    model, tokenizer, _ = load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    data = load_task_data(cfg, tokenizer, read_sources(cfg))
    refs, _ = drift.references_for_run(
        cfg, tmp_path, model, data, autocast=contextlib.nullcontext, precision="fp32", resuming=False
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # θ ≠ θ0
    kl, nll = drift.kl_and_nll(model, refs["task"], contextlib.nullcontext, 16)
    run = SimpleNamespace(data=data, model=model, cfg=cfg, tokenizer=tokenizer, device=torch.device("cpu"),
                          autocast=contextlib.nullcontext)  # fmt: skip
    assert nll == pytest.approx(validation_loss(run), rel=1e-5) and kl > 0
    assert kl == pytest.approx(drift.kl_per_token(model, refs["task"], contextlib.nullcontext, 4), rel=1e-5)
