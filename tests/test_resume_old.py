"""A run directory written before the trainer state became typed (tests/data/pre_redesign_run: a
checkpoint at step 2, metrics up to step 3, data mixing on) resumes with today's code, and its
steps 3 and 4 are those of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import sentiment_records, tiny_overrides, write_jsonl

from fulltune.config import load_config
from fulltune.train import run_training

OLD = Path(__file__).parent / "data" / "pre_redesign_run"
EXTRA = {"train.max_steps": 4, "train.save_interval": 2, "train.keep_checkpoints": 5, "data.mix_ratio": 0.25}


def _inputs(tmp: Path, tiny_dir: Path) -> None:
    """The model and data at the relative paths the old run's config.yaml names."""
    shutil.copytree(tiny_dir, tmp / "tiny")
    write_jsonl(tmp / "d.jsonl", sentiment_records(24))
    write_jsonl(tmp / "general.jsonl", [{"text": r["messages"][0]["content"]} for r in sentiment_records(16, seed=1)])


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_checkpoint_from_before_the_redesign_resumes_exactly(tiny_dir, tmp_path, monkeypatch):
    _inputs(tmp_path, tiny_dir)
    monkeypatch.chdir(tmp_path)  # the old config names tiny, d.jsonl, general.jsonl and run relative to its cwd
    shutil.copytree(OLD, tmp_path / "run", ignore=shutil.ignore_patterns("make.py", "old_code_step4.json"))
    overrides = tiny_overrides(
        Path("tiny"), Path("d.jsonl"), Path("run"), **EXTRA, **{"data.general": "[general.jsonl]"}
    )
    old_state = json.loads((OLD / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    run_training(load_config(None, [*overrides, "train.resume=auto"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4 and results["state_memory"] == old_state["results"]["state_memory"]
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3, 4]  # step 3's line from before the kill was trimmed and written again

    fresh_overrides = tiny_overrides(Path("tiny"), Path("d.jsonl"), Path("fresh"), **EXTRA)
    run_training(load_config(None, [*fresh_overrides, "data.general=[general.jsonl]"]))
    fresh = _losses(tmp_path / "fresh")
    for step in (3, 4):
        assert abs(resumed[step] - fresh[step]) <= 1e-5 * abs(fresh[step]), (step, resumed[step], fresh[step])
    old_step4 = json.loads((OLD / "old_code_step4.json").read_text())["loss"]  # the old code's own step 4
    assert abs(resumed[4] - old_step4) <= 1e-4 * abs(old_step4)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert set(old_state) <= set(state) and state["general_target_tokens"] > old_state["general_target_tokens"]
    assert state["sampler"]["task_seen"] == 16 and state["health"]["reference"] == old_state["health"]["reference"]
