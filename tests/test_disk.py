"""A full disk or an unwritable directory while writing a checkpoint, final/ or metrics: one line,
naming the path (and the bytes), the previous checkpoint intact, nothing half-written left."""

from __future__ import annotations

import errno
from collections import namedtuple

from conftest import QUICKSTART, tiny_overrides

from fulltune import atomic, checkpoint
from fulltune.cli import main

Usage = namedtuple("Usage", "total used free")


def _args(tiny_dir, data, out, **extra):
    return [
        "train",
        QUICKSTART,
        *tiny_overrides(
            tiny_dir,
            data,
            out,
            **{"train.max_steps": 4, "train.save_interval": 2, "train.keep_checkpoints": 5, **extra},
        ),
        "eval.task_file=",
        "data.val_fraction=0",
    ]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_a_full_disk_while_writing_a_checkpoint(monkeypatch, capsys, tiny_dir, chat_file, tmp_path):
    real = checkpoint.save_model
    calls = []

    def full_disk(model, filename):  # torch and safetensors report ENOSPC in their own words
        calls.append(filename)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4056")
        real(model, filename)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 2
    line = _error(capsys)
    ckpt = out / "checkpoints" / "step-0000004"
    assert line.startswith(f"fulltune: error: {ckpt}: no space left on the device (0.00 GB free, about ")
    assert line.endswith(
        "GB needed); the previous checkpoint is intact: free some space, then resume with train.resume=auto"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # no .tmp left
    assert checkpoint.checkpoint_problem(out / "checkpoints" / "step-0000002") is None
    monkeypatch.undo()
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": "auto"})) == 0


def test_an_unwritable_final_directory(monkeypatch, capsys, tiny_dir, chat_file, tmp_path):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", refuse)
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 2
    assert (
        _error(capsys)
        == f"fulltune: error: {out / 'final'}: not writable (Permission denied); the previous checkpoint is intact"
    )
    assert not (out / "final").exists() and not list(out.glob(".final*"))
    assert (out / "checkpoints" / "step-0000004").is_dir()  # the trained weights were saved first


def test_a_full_disk_while_logging_metrics(monkeypatch, capsys, tiny_dir, chat_file, tmp_path):
    import builtins

    real_open = builtins.open

    def no_space(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_space)
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 2
    assert _error(capsys).startswith(f"fulltune: error: {out / 'metrics.jsonl'}: no space left on the device (")


def test_a_torn_last_metrics_line_does_not_block_resume(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out, **{"train.max_steps": 2})) == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.5, "lr"')  # a kill while the line was written
    assert (
        main(
            _args(
                tiny_dir,
                chat_file,
                out,
                **{"train.max_steps": 3, "train.resume": "auto", "train.allow_schedule_change": "true"},
            )
        )
        == 0
    )
    assert [line[:10] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        '{"step": 1',
        '{"step": 2',
        '{"step": 3',
    ]
