"""User errors end in one clear message and a non-zero exit, with no traceback and no damage."""

import re
import subprocess
import sys

import pytest
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl

from fulltune.cli import main


def _fail(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("fulltune: error: ") == 1
    err = err[err.index("fulltune: error: ") :]
    return err


def test_unknown_key_reported_before_any_model_loads(capsys, tmp_path):
    err = _fail(
        capsys,
        ["train", QUICKSTART, "optim.learning_rate=1e-4", "model.path=/does/not/exist", "train.micro_batch_size=0"],
    )
    assert "optim.learning_rate: unknown key" in err and "train.micro_batch_size: 0 must be >= 1" in err
    assert "model.path not found" not in err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune", "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fulltune: error: config file not found: {tmp_path / 'missing.yaml'}"


def test_a_parser_error_is_said_once(tiny_dir, tmp_path):
    """datasets logs its own parser errors: as a process, the user sees only fulltune's line."""
    ragged = tmp_path / "r.csv"
    ragged.write_text("prompt,completion\na,b\nc,d,e,f\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune", "train", QUICKSTART, *tiny_overrides(tiny_dir, ragged, tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    bars = re.compile(r"[^\r\n]*(it|examples)/s\]")  # tqdm's bars; a log line may follow one on the same line
    said = [line for line in bars.sub("", proc.stderr.replace("\r", "\n")).splitlines() if line.strip()]
    assert said == [
        f"fulltune: error: {ragged}: could not read records: ParserError: Error tokenizing data. C error: "
        "Expected 2 fields in line 3, saw 4"
    ], said


def test_schedule_command_prints_and_plots(capsys, tmp_path):
    out = tmp_path / "lr.png"
    assert main(["schedule", QUICKSTART, "train.max_steps=100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cosine schedule over 100 steps" in text
    rows = {int(line.split()[0]): float(line.split()[1]) for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert rows[0] == pytest.approx(2e-5) and rows[4] == pytest.approx(1e-4) and rows[99] < 1e-7
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_dir, tmp_path, sig, code):
    """Ctrl-C (SIGINT), or SIGTERM as SLURM and Kubernetes send before SIGKILL."""
    import json
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(400))
    args = [
        sys.executable,
        "-m",
        "fulltune",
        "train",
        QUICKSTART,
        *tiny_overrides(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 100000}),
        "eval.task_file=",
        "data.val_fraction=0",
        "train.save_interval=0",
    ]  # only the Ctrl-C checkpoint
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600  # generous: a loaded machine can take minutes to import torch
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.exists(), "training never started"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err
    assert "continue with train.resume=auto" in err and "Traceback" not in err
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert step >= 3 and len(metrics.read_text().splitlines()) == step
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *tiny_overrides(
                    tiny_dir,
                    data,
                    tmp_path / "run",
                    **{"train.max_steps": step + 2, "train.allow_schedule_change": "true"},
                ),
                "eval.task_file=",
                "data.val_fraction=0",
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, step + 3))


def test_overrides_may_follow_an_option(capsys, tmp_path):
    out = tmp_path / "lr.png"
    assert main(["schedule", QUICKSTART, "--out", str(out), "train.max_steps=77", "schedule.name=constant"]) == 0
    assert "constant schedule over 77 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["schedule", QUICKSTART, "--bogus"])
