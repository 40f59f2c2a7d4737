"""train.loggers: MLflow and W&B (the real packages, a local store and offline mode) get every number
metrics.jsonl holds, step for step, and at the end the verdicts and the run's files; a resumed run
continues the same MLflow and W&B run without sending a step twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART, sentiment_records, tiny_overrides, write_jsonl
from test_tensorboard import _metrics

from fulltune.cli import main
from fulltune.trackers import _metric_key

MC = [
    {"context": "the movie was", "choices": [" great fun", " dull"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good"], "gold": 1},
]


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fulltune").experiment_id])
    assert len(runs) == 1  # a resume continues the run, never starts another
    return client, runs[0]


def _wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every history row of the run's offline W&B directories, read from their .wandb files (a log of
    protobuf records in LevelDB's framing: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, list] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            if left < 7 or kind == 0:  # the block's padding
                pos += left
                continue
            chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):  # FIRST, MIDDLE: the record goes on
                continue
            record, chunk = pb.Record.FromString(chunk), b""
            if record.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                for tag, value in row.items():
                    if not tag.startswith("_"):
                        out.setdefault(tag, []).append((row["_step"], value))
    return out


def _same(a: dict, b: dict, skip=()) -> None:
    assert a.keys() - set(skip) == b.keys() - set(skip)
    for tag in a.keys() - set(skip):
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
        assert all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for (_, x), (_, y) in zip(a[tag], b[tag])), tag


@pytest.fixture
def runs(tiny_dir, tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no W&B login here: offline
    data = write_jsonl(tmp_path / "chat.jsonl", sentiment_records(24))
    settings = {
        "train.max_steps": 4,
        "train.save_interval": 2,
        "train.loggers": "[mlflow, wandb]",
        "train.report": True,
        "data.val_fraction": 0.2,
        "train.val_interval": 2,
        "eval.task_file": write_jsonl(tmp_path / "task.jsonl", sentiment_records(6, seed=3)),
        "eval.labels": "[positive, negative]",
        "eval.probes": f"[mc:{write_jsonl(tmp_path / 'mc.jsonl', MC)}]",
    }

    def train(out: Path, *extra: str) -> None:
        assert main(["train", QUICKSTART, *tiny_overrides(tiny_dir, data, out, **settings), *extra]) == 0

    return train, tmp_path


def test_mlflow_and_wandb_hold_every_metric_and_a_resume_continues_them(runs):
    train, tmp = runs
    out = tmp / "run"
    train(out)
    metrics, results = _metrics(out), json.loads((out / "results.json").read_text())
    client, run = _mlflow(out)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
    for tag, series in metrics.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, _metric_key(tag))]
        _same({tag: sorted(history)}, {tag: sorted(series)})
    (probe, row), *_ = results["forgetting"]["probes"].items()
    assert run.data.tags[_metric_key(f"forgetting/{probe}/verdict")] == row["verdict"]
    assert run.data.metrics["final/task_accuracy_final"] == results["task_accuracy_final"]["accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.yaml", "report.html"} <= artifacts
    assert (out / "mlflow-artifacts").is_dir() and not (Path.cwd() / "mlartifacts").exists()
    _same(_wandb_history(out), metrics)
    assert len(list(out.glob("wandb/offline-run-*"))) == 1

    # killed after step 4's lines were sent, before its checkpoint: the resumed run redoes steps 3 and 4
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    train(out, "train.resume=auto")
    resumed, (client, again) = _metrics(out), _mlflow(out)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == [1, 2, 3, 4]  # each step once, though steps 3-4 ran twice
    timings = {"tokens_per_s", "flops_per_s", "mfu", "elapsed_s", "step_time_s", "memory_gb", "peak_memory_gb"}
    _same(_wandb_history(out), resumed, skip=timings)  # the resumed W&B run (a second offline directory) adds no step
    assert len(list(out.glob("wandb/offline-run-*"))) == 2


def test_a_missing_tracker_package_is_one_line_before_the_model_loads(
    capsys, tiny_dir, chat_file, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "run"
    args = tiny_overrides(tiny_dir, chat_file, out, **{"train.loggers": "[tensorboard, mlflow]"})
    assert main(["train", QUICKSTART, *args, "eval.task_file="]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(
        "fulltune: error: train.loggers: mlflow needs the mlflow package: pip install 'fulltune[mlflow]'"
    )
    assert "Traceback" not in err and not (out / "final").exists()
