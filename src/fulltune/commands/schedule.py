"""`fulltune schedule`: the learning rate a config will use, printed and drawn before training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fulltune import config_checks
from fulltune.assets import resolve_data_path
from fulltune.config import RunConfig
from fulltune.config_checks import check_run_length
from fulltune.data.sources import load_records
from fulltune.optim.schedules import schedule_fn, warmup_steps


def planned_steps(cfg: RunConfig) -> tuple[int, str]:
    """Total optimiser steps and how they were derived (records counted, not tokenised). A length the
    run would refuse (config_checks.LONG_RUN) is refused here too, before any table or plot is made."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps, "train.max_steps"
    records = len(load_records(resolve_data_path(cfg.data.train)))
    check_run_length(cfg, records)
    held_out = cfg.data.val_fraction > 0 and not cfg.data.validation
    n = records - (max(1, round(cfg.data.val_fraction * records)) if held_out else 0)
    return config_checks.planned_steps(cfg, records), (
        f"{n} records / ({t.micro_batch_size}×{t.grad_accum_steps}) × {t.epochs} epochs; "
        "sequences dropped as overlong would make it slightly fewer"
    )


def schedule_table(cfg: RunConfig, total: int) -> list[tuple[int, float]]:
    fn = schedule_fn(cfg.schedule, cfg.optim.lr, total)
    warm = warmup_steps(cfg.schedule, total)
    steps = sorted({0, max(0, warm - 1), warm, total // 4, total // 2, (3 * total) // 4, total - 1})
    return [(s, cfg.optim.lr * fn(s)) for s in steps if 0 <= s < total]


def plot_schedules(cfg: RunConfig, total: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    stride = max(1, total // 4000)  # a long run is drawn from ≤ ~4,000 points of its curve, never one per step
    steps = sorted(set(range(0, total + 1, stride)) | {warmup_steps(cfg.schedule, total), total})
    names = [cfg.schedule.name] + [n for n in ("cosine", "constant", "linear") if n != cfg.schedule.name]
    for name in names:
        fn = schedule_fn(replace(cfg.schedule, name=name), cfg.optim.lr, total)
        mine = name == cfg.schedule.name
        ax.plot(
            steps,
            [cfg.optim.lr * fn(s) for s in steps],
            lw=2.2 if mine else 1.2,
            ls="-" if mine else "--",
            label=f"warmup + {name}" + (" (this config)" if mine else ""),
        )
    warm = warmup_steps(cfg.schedule, total)
    ax.axvline(warm, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("learning rate (top layer)")
    ax.set_title(f"{total} steps, warmup {warm}, peak {cfg.optim.lr:g}, min {cfg.schedule.min_lr:g}")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def register(sub) -> None:
    s = sub.add_parser("schedule", help="print and plot the learning-rate schedule of a config")
    s.add_argument("config", help="YAML config (see configs/quickstart.yaml)")
    s.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. train.epochs=2")
    s.add_argument("--out", default="schedule.png", help="PNG to write (default: schedule.png)")
    s.set_defaults(run=run)


def run(args) -> None:
    from fulltune.config import load_config

    run_schedule(load_config(args.config, args.overrides), Path(args.out))


def run_schedule(cfg: RunConfig, out: Path) -> None:
    total, how = planned_steps(cfg)
    print(f"{cfg.schedule.name} schedule over {total} steps ({how})")
    if cfg.optim.layer_lr_decay != 1.0:
        print(
            f"layer_lr_decay {cfg.optim.layer_lr_decay}: rates below are the top layer's; layer l (0 = last) "
            f"gets them × {cfg.optim.layer_lr_decay}^-l"
        )
    print(f"{'step':>8}  {'lr':>10}")
    for step, lr in schedule_table(cfg, total):
        print(f"{step:>8}  {lr:>10.3e}")
    plot_schedules(cfg, total, out)
    print(f"wrote {out}")
