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
        f"fulltune: error: {ragged}:3: 4 fields, but the header has 2; a cell holding a comma must be in double quotes"
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
    assert main(["schedule", QUICKSTART, "--bogus"]) == 2
    assert capsys.readouterr().err == (
        "fulltune: error: schedule: unrecognized arguments: --bogus (see fulltune schedule --help)\n"
    )


# ---- every verb's --help, and its usage errors, derived from the real parser --------------------------------------
def _verbs() -> dict:
    from fulltune.cli import parser, verb_parsers

    return verb_parsers(parser())


def test_the_parser_has_every_verb_module():
    """chat and generate come from one module (generate); every other verb is its module's name."""
    from fulltune.commands import VERBS

    assert set(_verbs()) == (set(VERBS) | {"chat"}) and len(_verbs()) == 14


def test_help_of_fulltune_itself_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "fulltune", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("usage: fulltune [-h]")
    for verb in _verbs():
        assert f"    {verb}" in proc.stdout, verb  # each verb listed with its one-line help


@pytest.mark.parametrize("verb", list(_verbs()))
def test_help_of_every_verb(capsys, verb):
    assert main([verb, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: fulltune {verb} [-h]") and err == ""
    assert not [a.dest for a in _verbs()[verb]._actions if not a.help], "every argument says what it is for"


def _usage_errors(verb: str, p) -> list[tuple[list[str], str]]:
    """(argv, the message after `fulltune: error: VERB: `) for each way to call VERB wrongly: without its
    required arguments, with an unknown option, a non-number for each numeric option, a value outside each
    option's choices."""
    positionals = [a for a in p._actions if not a.option_strings and a.required]
    fillers = ["x"] * len(positionals)  # parse, never run: every call below fails in the parser
    cases = [([verb, *fillers, "--no-such-option"], "unrecognized arguments: --no-such-option")]
    if positionals:
        names = ", ".join(a.metavar or a.dest for a in positionals)
        cases.append(([verb], f"the following arguments are required: {names}"))
    for a in p._actions:
        if a.option_strings and a.type in (int, float):
            cases.append(
                ([verb, *fillers, a.option_strings[0], "abc"], f"argument {a.option_strings[0]}: invalid "
                 f"{a.type.__name__} value: 'abc'")
            )  # fmt: skip
        elif a.option_strings and a.choices:
            shown = ", ".join(repr(c) for c in a.choices)
            cases.append(
                ([verb, *fillers, a.option_strings[0], "nope"], f"argument {a.option_strings[0]}: invalid choice: "
                 f"'nope' (choose from {shown})")
            )  # fmt: skip
    return cases


@pytest.mark.parametrize("verb", list(_verbs()))
def test_every_usage_error_of_every_verb_is_one_line(capsys, verb):
    cases = _usage_errors(verb, _verbs()[verb])
    assert len(cases) >= 1
    for argv, message in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err == f"fulltune: error: {verb}: {message} (see fulltune {verb} --help)\n", argv


def test_usage_errors_without_a_verb(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err == (
        "fulltune: error: no verb given (one of " + ", ".join(_verbs()) + ") (see fulltune --help)\n"
    )
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fulltune: error: argument command: invalid choice: 'trian' (choose from 'train', ")
    assert err.count("\n") == 1


def test_a_usage_error_as_a_process_is_one_line(tmp_path):
    """argparse used to print its usage and then `fulltune train: error: ...`: two lines, no `fulltune: error:`."""
    proc = subprocess.run([sys.executable, "-m", "fulltune", "train"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "fulltune: error: train: the following arguments are required: config (see fulltune train --help)\n"
    )


def test_chat_with_standard_input_closed_ends_cleanly(tiny_dir):
    """`fulltune chat MODEL < /dev/null`: end of input at the first prompt is the end of the chat."""
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune", "chat", str(tiny_dir)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["you> ", "[chat] end of input; bye"]


def test_schedule_refuses_an_implausible_length_and_plots_a_long_one(capsys, tmp_path, chat_file):
    out = tmp_path / "lr.png"
    assert main(["schedule", QUICKSTART, "train.epochs=1e9", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "  train.epochs: 1e+09 epochs is at least 1,000,000,000 optimiser steps (one or more each), more than "
        "10,000,000; if you mean it, set train.allow_long_run=true (set on the command line)"
    )
    assert main(["schedule", QUICKSTART, f"data.train={chat_file}", "train.epochs=2e6", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after datasets' progress bar
        "fulltune: error: train.epochs: 2e+06 epochs of 24 records at 2×1 sequences a step is about 24,000,000 "
        "optimiser steps, more than 10,000,000; if you mean it, set train.allow_long_run=true"
    )
    assert not out.exists()
    args = ["train.max_steps=50000000", "train.allow_long_run=true", "--out", str(out)]
    assert main(["schedule", QUICKSTART, *args]) == 0  # allowed: the plot samples the curve, never 5e7 points
    assert "cosine schedule over 50000000 steps" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
