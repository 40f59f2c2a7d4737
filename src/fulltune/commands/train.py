"""`fulltune train CONFIG [key=value ...]`: fully fine-tune θ0; `--nproc G` launches G ranks with torchrun."""

from __future__ import annotations

from fulltune.errors import UserError


def register(sub) -> None:
    t = sub.add_parser("train", help="fully fine-tune θ0 on a dataset")
    t.add_argument("config", help="YAML config (see configs/quickstart.yaml)")
    t.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. optim.lr=3e-5")
    t.add_argument("--resume", metavar="auto|PATH", help="same as train.resume=...: continue from a checkpoint")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="G",
        help="train on G processes on this host (GPUs, or CPU ranks) with FSDP2, launched by torchrun; "
        "for several nodes run torchrun yourself (see README)",
    )
    t.set_defaults(run=run)


def run(args) -> int:
    from fulltune.config import load_config

    overrides = args.overrides + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # every config error before any model loads
    if args.nproc < 1:
        raise UserError("--nproc must be ≥ 1")
    if args.nproc > 1:
        from fulltune.distributed import launch

        return launch(args.nproc, ["train", args.config, *overrides])
    from fulltune.train import run_training

    run_training(cfg)  # the run directory is locked while it runs, and free again however it ends
    return 0
