"""RUN/metrics.jsonl has one owner: `MetricsLog`. It appends a record per logged step (strict JSON:
NaN and inf as null), trims the lines past a resumed checkpoint's step so they are written again,
reads the file back for the report, and mirrors every record's numbers to the trackers
(`train.loggers`: TensorBoard, MLflow, W&B; trackers.py). Only rank 0 writes.

`Progress` is the terminal's view of the same records: tqdm's bar with loss, lr, tok/s, padding,
memory now/peak and MFU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from fulltune import trackers
from fulltune.atomic import write_failure
from fulltune.errors import UserError

FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, *, log_interval: int, trackers: list, resumed_step: int, writer: bool):
        """`resumed_step`: the checkpoint's step when resuming (its later lines are trimmed), else 0.
        `writer`: this process writes (rank 0); other ranks hold a log that writes nothing.
        `trackers`: trackers.open_trackers' (rank 0's), given every record's numbers."""
        self.path, self.log_interval, self.writer, self.trackers = run_dir / FILE, log_interval, writer, trackers
        if writer and resumed_step:
            trim(self.path, resumed_step)

    def log_step(self, record: dict, last: bool) -> None:
        """A step's record, written every `train.log_interval` steps, with an evaluation, and at the last."""
        if record["step"] % self.log_interval == 0 or "val_loss" in record or "probes" in record or last:
            self.append(record)

    def append(self, record: dict) -> None:
        if not self.writer:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(finite) + "\n")
        except OSError as exc:
            raise UserError(write_failure(exc, self.path, 1 << 20) or f"{self.path}: cannot write ({exc})") from None
        if self.trackers and "step" in record:
            trackers.log(self.trackers, self.path.parent, scalars(record), record["step"])

    def end(self, results: dict | None, status: str = "FINISHED") -> None:
        """The trackers' runs ended: a finished run's verdicts and files (trackers.end), or a status."""
        ending, self.trackers = self.trackers, []
        trackers.end(ending, self.path.parent, results, status)


def read(run_dir: Path) -> list[dict]:
    """Every record of RUN/metrics.jsonl (none if absent); a torn last line (a kill mid-write) is skipped."""
    path = run_dir / FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: malformed JSON line") from None
    return records


def trim(path: Path, step: int) -> None:
    """Drop the lines past the resumed step (and its closing val line): they will be written again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    try:
        json.loads(lines[-1]) if lines else None
    except ValueError:
        lines = lines[:-1]  # torn by a kill while it was written; that step is redone
    rows = [json.loads(line) for line in lines]
    keep = [r for r in rows if r.get("step", 0) < step or (r.get("step") == step and "loss" in r)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers by tag: nested dicts as a/b, lists as a/0, a/1 (lr per parameter group)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, (list, tuple)):
            out.update(scalars({str(i): v for i, v in enumerate(value)}, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step" and math.isfinite(value):
            out[tag] = float(value)
    return out


class Progress:
    """The progress bar (rank 0, `train.progress`), one update per step from the step's record."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, desc="train", disable=not enabled, dynamic_ncols=True)

    def show(self, rec: dict) -> None:
        shown = {
            "loss": f"{rec['loss']:.4f}",
            "lr": f"{max(rec['lr'].values()):.2e}",
            "tok_s": f"{rec['tokens_per_s']:.0f}",
            "pad": f"{100 * rec['padding_fraction']:.0f}%",
            "mem": f"{rec['memory_gb']:.1f}/{rec['peak_memory_gb']:.1f}G",
        }
        if "mfu" in rec:
            shown["mfu"] = f"{100 * rec['mfu']:.0f}%"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def note(self, line: str) -> None:
        tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
