"""Bad input and interrupted work: clear errors, nothing lost, no silent change on resume."""

import json
import os
import shutil

import pytest
import torch
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl

from fulltune import atomic
from fulltune.assets import resolve_data_path
from fulltune.atomic import write_manifest
from fulltune.cli import main
from fulltune.config import load_config
from fulltune.data.sources import load_records
from fulltune.errors import UserError
from fulltune.train import run_training


def _run(tiny_dir, data, out, **extra):
    return run_training(load_config(None, tiny_overrides(tiny_dir, data, out, **extra)))


def test_resume_refuses_changed_settings(tiny_dir, chat_file, tmp_path):
    _run(tiny_dir, chat_file, tmp_path / "r", **{"train.max_steps": 2, "train.save_interval": 1})
    with pytest.raises(UserError, match=r"optim.lr: 0.001 → 1e-05; optim.weight_decay: 0.0 → 0.1"):
        _run(
            tiny_dir,
            chat_file,
            tmp_path / "r",
            **{"train.max_steps": 4, "train.resume": "auto", "optim.lr": 1e-5, "optim.weight_decay": 0.1},
        )


def test_a_resume_may_switch_on_activation_checkpointing(tiny_dir, chat_file, tmp_path):
    """What the out-of-memory line offers: the savers recompute the same values, so the resumed run's
    weights are the straight run's (bitwise on this CPU); a changed micro-batch is still refused."""
    from safetensors.torch import load_file

    _run(tiny_dir, chat_file, tmp_path / "straight", **{"train.max_steps": 4})
    _run(tiny_dir, chat_file, tmp_path / "r", **{"train.max_steps": 4, "train.save_interval": 2})
    shutil.rmtree(tmp_path / "r" / "final")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-0000004")
    with pytest.raises(UserError, match=r"train.micro_batch_size: 4 → 2"):
        _run(
            tiny_dir,
            chat_file,
            tmp_path / "r",
            **{"train.max_steps": 4, "train.resume": "auto", "train.micro_batch_size": 2},
        )
    run = _run(
        tiny_dir,
        chat_file,
        tmp_path / "r",
        **{"train.max_steps": 4, "train.resume": "auto", "model.activation_checkpointing": True},
    )
    assert run.state.step == 4 and run.cfg.model.activation_checkpointing
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("straight", "r"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_never_silently_restretches_the_schedule(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    _run(tiny_dir, chat_file, out, **{"train.max_steps": 4, "train.save_interval": 2})
    ckpt = out / "checkpoints" / "step-0000002"
    with pytest.raises(
        UserError,
        match=r"the run had 4 steps and now has 8 \(train.max_steps / train.epochs\), which "
        r"re-stretches the lr schedule after step 2; set train.allow_schedule_change=true",
    ):
        _run(tiny_dir, chat_file, out, **{"train.max_steps": 8, "train.resume": str(ckpt)})
    with pytest.raises(UserError, match="train.max_steps: 1 steps is below the checkpoint's step 2"):
        _run(
            tiny_dir,
            chat_file,
            out,
            **{"train.max_steps": 1, "train.resume": str(ckpt), "train.allow_schedule_change": True},
        )
    capsys.readouterr()
    run = _run(
        tiny_dir,
        chat_file,
        out,
        **{"train.max_steps": 8, "train.resume": str(ckpt), "train.allow_schedule_change": True},
    )
    assert run.state.step == 8 and run.state.total_steps == 8
    # warmup 1 step, then cosine: at step index 2, ½(1 + cos(π·1/3)) = 0.75 over 4 steps,
    # ½(1 + cos(π·1/7)) = 0.950 over 8.
    assert (
        "schedule changed (train.allow_schedule_change): 4 → 8 steps; lr at step 3: 0.00075 on the old curve → "
        "0.00095 on the new one, which ends at step 8" in capsys.readouterr().out
    )


def test_resume_compares_the_resolved_precision(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    _run(tiny_dir, chat_file, out, **{"train.max_steps": 2})
    state_file = out / "checkpoints" / "step-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["precision"] == "fp32"
    state_file.write_text(
        json.dumps({**state, "precision": "bf16-mixed"})
    )  # as if trained on a machine with bf16 units
    write_manifest(state_file.parent)  # a genuine checkpoint, not a damaged one
    with pytest.raises(
        UserError,
        match="it trained in bf16-mixed, and train.precision fp32 resolves to fp32 here; "
        "set train.precision=bf16-mixed",
    ):
        _run(tiny_dir, chat_file, out, **{"train.max_steps": 2, "train.resume": "auto"})


def test_resume_drops_checkpoints_from_an_abandoned_future(tiny_dir, chat_file, tmp_path):
    extra = {"train.max_steps": 3, "train.save_interval": 1, "train.keep_checkpoints": 5}
    _run(tiny_dir, chat_file, tmp_path / "r", **extra)
    ckpts = tmp_path / "r" / "checkpoints"
    _run(
        tiny_dir,
        chat_file,
        tmp_path / "r",
        **{
            **extra,
            "train.resume": str(ckpts / "step-0000001"),
            "train.max_steps": 2,
            "train.allow_schedule_change": True,
        },
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002"]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2]


def test_bad_task_file_with_overwrite_keeps_the_old_run(capsys, tiny_dir, chat_file, tmp_path):
    args = [
        "train",
        QUICKSTART,
        *tiny_overrides(tiny_dir, chat_file, tmp_path / "r", **{"train.max_steps": 1}),
        "eval.task_file=",
        "data.val_fraction=0",
    ]
    assert main(args) == 0
    bad = write_jsonl(
        tmp_path / "task.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "neutral"}]}],
    )
    assert main(args + ["train.overwrite=true", f"eval.task_file={bad}", "eval.labels=[positive, negative]"]) == 2
    assert f"{bad}:1: answer 'neutral' is not one of eval.labels" in capsys.readouterr().err
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "r" / "checkpoints" / "step-0000001").is_dir()


def test_home_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    path = resolve_data_path("~/d.jsonl")
    assert path == str(tmp_path / "d.jsonl") and len(load_records(path)) == 1


def test_csv_cells_stay_strings(tmp_path):
    (tmp_path / "n.csv").write_text('prompt,completion\n"2+2 =",4\n"3+3 =",6\n')
    assert load_records(str(tmp_path / "n.csv"))[0] == {"prompt": "2+2 =", "completion": "4"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.labels=[positive, negative", "is not valid YAML"),
        ("optim.lr=nan", "optim.lr: nan must be a finite number"),
        ("schedule.min_lr=1e-3", "schedule.min_lr: 0.001 is above optim.lr"),
        ("train.seed=100000000000000", "must be <= 2147483647"),
    ],
)
def test_config_values_that_would_crash_later(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(QUICKSTART, [override])


def test_hold_out_that_leaves_nothing_to_train(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", sentiment_records(1))
    with pytest.raises(UserError, match="leaves no training sequences"):
        _run(tiny_dir, data, tmp_path / "r", **{"data.val_fraction": 0.5})


def test_chat_template_refusal_is_a_clear_error(tmp_path):
    from conftest import make_tokenizer

    from fulltune.config import DataConfig
    from fulltune.data.formats import encode_dataset

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == messages[loop.index0 - 1]['role'] and not loop.first %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]
    )
    with pytest.raises(
        UserError, match=r"c\.jsonl:1: the chat template rejected this conversation: roles must alternate"
    ):
        encode_dataset(load_records(str(path)), tok, DataConfig(), str(path))


def test_atomic_dir_restores_the_old_copy_if_interrupted_between_renames(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_dir_atomically(final, lambda tmp: (tmp / "weights").write_text("new"))
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (final / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_run_longer_than_a_day_at_the_measured_matmul_peak_asks_first(tiny_dir, tmp_path, monkeypatch, capsys):
    """train.allow_long_run: 50 tiny steps on a machine that measured 1 kFLOP/s is more than a day even
    at that peak; refused in one line before anything is written, and run when allowed."""
    from fulltune import run_setup

    monkeypatch.setattr(run_setup, "run_peak", lambda *args: 1e3)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    args = ["train", str(config), *tiny_overrides(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 50})]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("fulltune")]
    assert (
        "Traceback" not in stderr
        and len(err) == 1
        and err[0].startswith("fulltune: error: train.epochs / train.max_steps: 50 optimiser steps ")
    )
    assert "hours here" in err[0] and err[0].endswith("more than a day; if you mean it, set train.allow_long_run=true")
    assert not (tmp_path / "run").exists()  # nothing written, and the directory it made for the lock removed
    assert main([*args, "train.allow_long_run=true", "train.max_steps=2"]) == 0


def test_the_time_rule_is_a_lower_bound_at_the_peak():
    from fulltune.config import load_config
    from fulltune.config_checks import check_run_time

    cfg = load_config(None)
    check_run_time(cfg, total_steps=86_400, epoch_flops=10.0, steps_per_epoch=10, peak=1.0)  # exactly a day: runs
    with pytest.raises(UserError, match="at least 24 hours here"):
        check_run_time(cfg, total_steps=86_401 * 10, epoch_flops=10.0, steps_per_epoch=10, peak=10.0)
    cfg.train.allow_long_run = True
    check_run_time(cfg, total_steps=10**9, epoch_flops=1e12, steps_per_epoch=1, peak=1.0)
