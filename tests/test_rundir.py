"""The run directory: a run deletes only what a run wrote, and never retrains over a final model."""

from __future__ import annotations

import json
import shutil

from conftest import QUICKSTART, tiny_overrides

from fulltune.cli import main
from fulltune.rundir import MARKER


def _args(tiny_dir, data, out, **extra):
    return [
        "train",
        QUICKSTART,
        *tiny_overrides(tiny_dir, data, out, **{"train.max_steps": 2, **extra}),
        "eval.task_file=",
        "data.val_fraction=0",
    ]


def _refused(capsys, args) -> str:
    """Run the command expecting a user error: exit 2, one line, no traceback. Returns the line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_directory_that_is_not_a_run_is_never_cleared(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "D"
    (out / "final").mkdir(parents=True)
    (out / "final" / "NOTES.txt").write_text("x")
    for extra in ({}, {"train.overwrite": "true"}, {"train.resume": "auto"}):
        err = _refused(capsys, _args(tiny_dir, chat_file, out, **extra))
        assert err == (
            f"fulltune: error: train.output_dir: {out} holds files that no fulltune run wrote (final); "
            "a run only clears its own directory: pick a new or empty train.output_dir"
        )
    assert (out / "final" / "NOTES.txt").read_text() == "x"
    assert sorted(p.name for p in out.rglob("*")) == ["NOTES.txt", "final"]


def test_empty_output_dir_and_a_file_are_config_errors(capsys, tiny_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_args(tiny_dir, chat_file, "")) == 2
    assert "train.output_dir: empty; name the run's directory" in capsys.readouterr().err  # the config's problem list
    assert [p.name for p in tmp_path.iterdir()] == ["chat.jsonl"]  # nothing written
    (tmp_path / "f").write_text("mine")
    assert (
        _refused(capsys, _args(tiny_dir, chat_file, tmp_path / "f"))
        == f"fulltune: error: train.output_dir: {tmp_path / 'f'} is a file, not a directory"
    )
    assert (tmp_path / "f").read_text() == "mine"


def test_resume_auto_never_retrains_over_a_finished_run(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    weights = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints")  # e.g. removed to save space, or the last checkpoint failed to write
    err = _refused(capsys, _args(tiny_dir, chat_file, out, **{"train.resume": "auto"}))
    assert "train.resume=auto:" in err and "holds a finished run (final/) and no checkpoint" in err
    assert (out / "final" / "model.safetensors").read_bytes() == weights
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # Explicitly allowed: trains again from θ0.
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": "auto", "train.overwrite": "true"})) == 0
    assert "starting from θ0" in capsys.readouterr().out


def test_resume_auto_in_a_new_directory_starts_from_theta0(capsys, tiny_dir, chat_file, tmp_path):
    """The first launch of a preemptible job that always passes resume=auto."""
    assert main(_args(tiny_dir, chat_file, tmp_path / "new", **{"train.resume": "auto"})) == 0
    assert "starting from θ0" in capsys.readouterr().out
    assert (tmp_path / "new" / MARKER).is_file()


def test_overwrite_clears_only_the_runs_own_outputs(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    (out / "NOTES.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    assert main(_args(tiny_dir, chat_file, out, **{"train.overwrite": "true", "train.max_steps": 1})) == 0
    assert (out / "NOTES.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_run_from_before_the_marker_is_still_a_run(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    (out / MARKER).unlink()
    assert "already holds a run; resume it with train.resume=auto" in _refused(capsys, _args(tiny_dir, chat_file, out))
    assert main(_args(tiny_dir, chat_file, out, **{"train.resume": "auto"})) == 0


def test_interrupted_checkpoint_writes_are_cleaned_or_put_back(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    extra = {"train.max_steps": 3, "train.save_interval": 1, "train.keep_checkpoints": 5}
    assert main(_args(tiny_dir, chat_file, out, **extra)) == 0
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-0000003")
    (ckpts / "step-0000002").rename(ckpts / ".step-0000002.old")  # killed between atomic.py's two renames
    (ckpts / ".step-0000003.tmp-k1ll3d").mkdir()  # killed while writing
    (ckpts / ".step-0000003.tmp-k1ll3d" / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / ".final.tmp-x").mkdir()
    assert main(_args(tiny_dir, chat_file, out, **{**extra, "train.resume": "auto"})) == 0
    printed = capsys.readouterr().out
    assert (
        f"restored {ckpts / 'step-0000002'}" in printed
        and f"resumed from {ckpts / 'step-0000002'} at step 2" in printed
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002", "step-0000003"]
    assert not (out / ".final.tmp-x").exists()


def test_an_overwrite_that_fails_keeps_the_replaced_run(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    good = (out / "final" / "model.safetensors").read_bytes()
    diverging = {"train.overwrite": "true", "optim.lr": 100, "train.max_steps": 8}  # stops at step 4: non-finite
    assert main(_args(tiny_dir, chat_file, out, **diverging)) == 2
    assert (out / ".previous-run" / "final" / "model.safetensors").read_bytes() == good
    assert main(_args(tiny_dir, chat_file, out, **diverging)) == 2  # again: the kept run is still the good one
    assert (out / ".previous-run" / "final" / "model.safetensors").read_bytes() == good
    assert main(_args(tiny_dir, chat_file, out, **{"train.overwrite": "true", "train.max_steps": 3})) == 0
    assert not (out / ".previous-run").exists() and (out / "final" / "model.safetensors").read_bytes() != good


# ---- one run at a time in a directory (rundir.claim_run_dir: flock on the directory) -------------------------------
HOLD = (
    "import sys, time; from pathlib import Path; from fulltune import rundir; rundir.lock_run_dir(Path(sys.argv[1])); "
)
HOLD += "print('locked', flush=True); time.sleep(600)"


def _holder(path):
    """A second process that takes the directory's lock the way a run does, and keeps it."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_into_a_directory_another_process_holds_is_refused(capsys, tiny_dir, chat_file, tmp_path):
    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    before = _snapshot(out)
    holder = _holder(out)
    try:
        for extra in ({"train.overwrite": "true"}, {"train.resume": "auto"}, {}):
            assert _refused(capsys, _args(tiny_dir, chat_file, out, **extra)) == (
                f"fulltune: error: train.output_dir: {out} is in use by another fulltune run (PID {holder.pid}); "
                "wait for it to end or stop it, or pick another train.output_dir"
            )
        assert _snapshot(out) == before and not (out / ".previous-run").exists()  # nothing moved or written
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(tiny_dir, chat_file, out, **{"train.overwrite": "true"})) == 0  # the kernel freed it


def test_a_second_fulltune_train_while_the_first_runs_then_a_killed_runs_lock_is_not_stale(capsys, tiny_dir, tmp_path):
    """Two real `fulltune train` processes into one directory: the second is refused naming the first's
    PID; once the first is SIGKILLed (no cleanup of its own), the next run proceeds."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import sentiment_records, write_jsonl

    from fulltune.rundir import lock_holder

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(400))
    out = tmp_path / "r"
    first = subprocess.Popen(
        [sys.executable, "-m", "fulltune", *_args(tiny_dir, data, out, **{"train.max_steps": 100000})],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists(), "the first run never started its steps"
        assert lock_holder(out) == first.pid
        assert _refused(capsys, _args(tiny_dir, data, out, **{"train.resume": "auto"})) == (
            f"fulltune: error: train.output_dir: {out} is in use by another fulltune run (PID {first.pid}); "
            "wait for it to end or stop it, or pick another train.output_dir"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_holder(out) is None  # released by the kernel with the killed process: nothing stale to clear
    assert main(_args(tiny_dir, data, out, **{"train.overwrite": "true"})) == 0


def test_the_lock_is_released_when_a_run_ends_or_fails(capsys, tiny_dir, chat_file, tmp_path):
    from fulltune.rundir import _HELD, lock_holder

    out = tmp_path / "r"
    assert main(_args(tiny_dir, chat_file, out)) == 0
    assert lock_holder(out) is None and not _HELD
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(_args(tiny_dir, tmp_path / "bad.jsonl", out, **{"train.overwrite": "true"})) == 2
    assert lock_holder(out) is None and not _HELD
    new = tmp_path / "new" / "deeper"  # a failed start into a new directory leaves no directory behind
    assert main(_args(tiny_dir, tmp_path / "bad.jsonl", new)) == 2
    assert not (tmp_path / "new").exists() and lock_holder(out) is None
    capsys.readouterr()


def test_only_the_claiming_rank_locks(tmp_path):
    """Under torchrun only rank 0 takes the lock (lock=D.is_main()); the other ranks only check."""
    from fulltune import rundir

    assert rundir.claim_run_dir(str(tmp_path / "a"), "", False, lock=False) == tmp_path / "a"
    assert not (tmp_path / "a").exists() and not rundir._HELD
    assert rundir.claim_run_dir(str(tmp_path / "a"), "", False) == tmp_path / "a"
    try:
        assert (tmp_path / "a").is_dir() and rundir.lock_holder(tmp_path / "a") == __import__("os").getpid()
    finally:
        rundir.release_run_dirs()
    assert not (tmp_path / "a").exists()  # made for the run, never written to: removed
