"""One crash-fuzz trial (bench/crash_fuzz.py runs 20): SIGKILLs at random moments, resume=auto,
and the final weights equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "crash_fuzz.py"
    spec = importlib.util.spec_from_file_location("crash_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_moments_then_resume_is_bitwise_the_straight_run(tiny_dir, chat_file, tmp_path):
    fuzz = _bench()
    result = fuzz.fuzz(tiny_dir, str(chat_file), tmp_path, trials=1, kills=2, steps=10, seed=1)
    (row,) = result["trials"]
    assert row["exit"] == 0, row["stderr"]
    assert row["bitwise_equal"] and row["metrics_equal"]
    assert len(row["events"]) == 2


def test_the_comparison_can_fail(tiny_dir, chat_file, tmp_path):
    """A run with other settings is told apart: the check is not vacuous."""
    fuzz = _bench()
    a, b = tmp_path / "a", tmp_path / "b"
    fuzz.subprocess.run(fuzz.command(tiny_dir, str(chat_file), a, 3), check=True, env=fuzz._env(), capture_output=True)
    fuzz.subprocess.run(
        fuzz.command(tiny_dir, str(chat_file), b, 3) + ["optim.lr=2e-3"],
        check=True,
        env=fuzz._env(),
        capture_output=True,
    )
    assert fuzz.compare(b, a) == {"bitwise_equal": False, "metrics_equal": False}
    assert fuzz.compare(a, a) == {"bitwise_equal": True, "metrics_equal": True}
