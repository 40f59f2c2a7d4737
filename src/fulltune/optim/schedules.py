"""Learning-rate schedules as pure functions of the step (resume needs no scheduler state).

`lr_multiplier(step)` scales each group's `initial_lr`. Step s runs with
    warmup:  (s + 1) / W                       for s < W  (reaches 1.0 on the last warmup step)
    decay:   p = (s − W) / (T − W) in [0, 1)   for s ≥ W
      cosine:   r + (1 − r) · ½(1 + cos πp)
      linear:   r + (1 − r) · (1 − p)
      constant: 1
with r = min_lr / lr. The value at s = T (after the last step) is r: the last update still
learns a little instead of wasting a step at exactly min_lr.
"""

from __future__ import annotations

import math

from fulltune.config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps >= 0:
        return min(cfg.warmup_steps, total_steps)
    return min(total_steps, round(cfg.warmup_ratio * total_steps))


def lr_multiplier(step: int, *, total_steps: int, warmup: int, name: str, min_ratio: float) -> float:
    assert 0 <= step <= total_steps and 0 <= warmup <= total_steps, (step, total_steps, warmup)
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {name!r}")


def schedule_fn(cfg: ScheduleConfig, lr: float, total_steps: int):
    """step → multiplier for this config (min_lr given in absolute terms)."""
    warm = warmup_steps(cfg, total_steps)
    ratio = cfg.min_lr / lr

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup=warm, name=cfg.name, min_ratio=ratio)

    return multiplier
