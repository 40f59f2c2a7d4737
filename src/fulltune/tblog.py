"""TensorBoard (`train.tensorboard`): every metrics.jsonl record's numbers as scalars in
RUN/tensorboard/, so `tensorboard --logdir runs/` shows the runs side by side. Rank 0 writes; a
resumed run purges the events past its checkpoint's step, as metrics.jsonl is trimmed."""

from __future__ import annotations

import math
from pathlib import Path


def open_writer(run_dir: Path, resumed_step: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)


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


def write(writer, record: dict) -> None:
    if writer is None or "step" not in record:
        return
    for tag, value in scalars(record).items():
        writer.add_scalar(tag, value, record["step"])
    writer.flush()
