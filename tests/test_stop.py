"""SIGTERM (and SIGINT) in every phase of a run: exit 128 + the signal, nothing lost, resumable."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import sentiment_records, tiny_overrides, write_jsonl

from fulltune import train
from fulltune.config import load_config
from fulltune.errors import Interrupted
from fulltune.evals import during_run
from fulltune.evals.during_run import task_accuracy


def _cfg(tiny_dir, tmp_path, **extra):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    task = write_jsonl(tmp_path / "task.jsonl", sentiment_records(6, seed=3))
    return load_config(
        None,
        tiny_overrides(
            tiny_dir,
            data,
            tmp_path / "run",
            **{"train.max_steps": 3, "eval.task_file": str(task), "eval.labels": "[positive, negative]", **extra},
        ),
    )


def _signal_during(monkeypatch, tag: str, sig=signal.SIGTERM):
    """task_accuracy(run, tag) receives `sig` half-way, as from SLURM or kill."""

    def evaluate(run, this_tag):
        if this_tag == tag:
            os.kill(os.getpid(), sig)
        return task_accuracy(run, this_tag)

    monkeypatch.setattr(during_run, "task_accuracy", evaluate)


def test_sigterm_while_evaluating_theta0_stops_at_once(monkeypatch, tiny_dir, tmp_path):
    _signal_during(monkeypatch, "θ0")
    with pytest.raises(Interrupted, match="stopped by SIGTERM, outside the training steps; no step was lost") as exc:
        train.run_training(_cfg(tiny_dir, tmp_path))
    assert exc.value.exit_code == 143
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()
    run = train.run_training(_cfg(tiny_dir, tmp_path, **{"train.resume": "auto"}))  # the requeued job
    assert run.state.step == 3


def test_sigterm_during_the_final_evaluation_keeps_the_trained_steps(monkeypatch, tiny_dir, tmp_path):
    _signal_during(monkeypatch, "θ*")
    with pytest.raises(Interrupted) as exc:
        train.run_training(_cfg(tiny_dir, tmp_path))
    assert exc.value.exit_code == 143
    (saved,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 3
    assert not (tmp_path / "run" / "results.json").exists()
    monkeypatch.undo()
    run = train.run_training(_cfg(tiny_dir, tmp_path, **{"train.resume": "auto"}))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run.state.step == 3 and "task_accuracy_final" in results and "task_accuracy_theta0" in results
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3]  # no step trained twice


def test_sigint_during_a_step_lets_it_finish_and_checkpoints(monkeypatch, tiny_dir, tmp_path):
    real = train.train_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(Interrupted, match="stopped at step 2; checkpoint .*step-0000002; continue with") as exc:
        train.run_training(_cfg(tiny_dir, tmp_path, **{"train.max_steps": 5}))
    assert exc.value.exit_code == 130 and len(calls) == 2


@pytest.mark.parametrize("second, aborts", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_repeated_sigterm_still_checkpoints_a_second_ctrl_c_aborts(monkeypatch, tiny_dir, tmp_path, second, aborts):
    """SLURM signals every process of the job and torchrun passes its SIGTERM on: a worker gets two.
    They are one request; a second Ctrl-C is a person who will not wait, and aborts at once."""
    real, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), second)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(Interrupted) as exc:
        train.run_training(_cfg(tiny_dir, tmp_path, **{"train.max_steps": 5, "eval.task_file": ""}))
    assert exc.value.exit_code == (130 if aborts else 143)
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir()) if (tmp_path / "run" / "checkpoints").exists() else []
    if aborts:
        assert "a second Ctrl-C during a step; the last checkpoint is intact" in str(exc.value) and saved == []
    else:
        assert str(exc.value).startswith("stopped at step 2; checkpoint") and [p.name for p in saved] == [
            "step-0000002"
        ]
