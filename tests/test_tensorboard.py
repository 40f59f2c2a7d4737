"""train.tensorboard: the event files hold metrics.jsonl's numbers, step for step, and a resumed run
purges the events past its checkpoint as metrics.jsonl is trimmed."""

from __future__ import annotations

import json
import shutil

from conftest import QUICKSTART, tiny_overrides

from fulltune.cli import main
from fulltune.metrics import scalars


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(run_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((record["step"], value))
    return out


def _close(a, b) -> bool:
    return a.keys() == b.keys() and all(
        [s for s, _ in a[t]] == [s for s, _ in b[t]]
        and all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for (_, x), (_, y) in zip(a[t], b[t]))
        for t in a
    )


def test_the_event_files_hold_the_metrics(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                QUICKSTART,
                *tiny_overrides(
                    tiny_dir,
                    chat_file,
                    out,
                    **{
                        "train.max_steps": 4,
                        "train.tensorboard": True,
                        "optim.layer_lr_decay": 1.5,
                        "data.val_fraction": 0.2,
                        "train.val_interval": 2,
                    },
                ),
                "eval.task_file=",
            ]
        )
        == 0
    )
    events, metrics = _events(out), _metrics(out)
    assert {"loss", "grad_norm", "lr/embed", "lr/layer.0", "lr/head", "tokens_per_s", "val_loss"} <= events.keys()
    assert [s for s, _ in events["loss"]] == [1, 2, 3, 4]
    assert _close(events, metrics)


def test_a_resume_purges_the_events_past_its_checkpoint(tiny_dir, chat_file, tmp_path):
    settings = {"train.max_steps": 4, "train.tensorboard": True, "train.save_interval": 2}
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = ["eval.task_file=", "data.val_fraction=0"]
    assert main(["train", QUICKSTART, *tiny_overrides(tiny_dir, chat_file, straight, **settings), *args]) == 0
    assert main(["train", QUICKSTART, *tiny_overrides(tiny_dir, chat_file, cut, **settings), *args]) == 0
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000004")  # as if killed after step 4's log line, before its checkpoint
    assert (
        main(["train", QUICKSTART, *tiny_overrides(tiny_dir, chat_file, cut, **settings), *args, "train.resume=auto"])
        == 0
    )
    resumed = _events(cut)
    assert [s for s, _ in resumed["loss"]] == [1, 2, 3, 4]  # steps 3 and 4 once each, from the resumed run
    drop = {
        "tokens_per_s",
        "flops_per_s",
        "mfu",
        "elapsed_s",
        "step_time_s",
        "memory_gb",
        "peak_memory_gb",
    }  # timings differ
    keep = lambda d: {t: v for t, v in d.items() if t not in drop}  # noqa: E731
    assert _close(keep(resumed), keep(_events(straight)))
