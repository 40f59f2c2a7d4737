"""The `fulltune` command: train | report | compare | chat | generate | eval | interpolate | memory | plan |
schedule | assets | config | verify."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fulltune.errors import Interrupted, OutOfMemory, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fulltune", description="Full fine-tuning of pre-trained causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fully fine-tune θ0 on a dataset")
    t.add_argument("config", help="YAML config (see configs/quickstart.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-5")
    t.add_argument("--resume", metavar="auto|PATH", help="same as train.resume=...: continue from a checkpoint")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="G",
        help="train on G processes on this host (GPUs, or CPU ranks) with FSDP2, launched by torchrun; "
        "for several nodes run torchrun yourself (see README)",
    )
    s = sub.add_parser("schedule", help="print and plot the learning-rate schedule of a config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--out", default="schedule.png", help="PNG to write (default: schedule.png)")
    _memory_parser(sub)
    _plan_parser(sub)
    from fulltune.evals.compare import add_parser as add_eval_parser

    add_eval_parser(sub)
    from fulltune.interpolate import add_parser as add_interpolate_parser

    add_interpolate_parser(sub)
    from fulltune.generate import add_parser as add_generate_parser

    add_generate_parser(sub)
    from fulltune.report import add_parser as add_report_parser

    add_report_parser(sub)
    from fulltune.compare_runs import add_parser as add_compare_parser

    add_compare_parser(sub)
    sub.add_parser("assets", help="fetch and prepare the embedded default model and SST-2 task")
    sub.add_parser("config", help="list every config key with its default and meaning")
    v = sub.add_parser("verify", help="check checkpoints or an exported model against their manifests (size, sha256)")
    v.add_argument(
        "paths", nargs="+", metavar="DIR", help="a checkpoint, a final/ directory, or a run directory (all of its)"
    )
    return p


def _memory_parser(sub) -> None:
    from fulltune.memory.estimate import ANCHORS, METHODS, OPTIMIZERS, PRECISIONS
    from fulltune.memory.report import GPUS

    m = sub.add_parser("memory", help="estimate the memory of a training setup, per GPU")
    m.add_argument(
        "model",
        nargs="?",
        default="default",
        help="preset (llama-7b, llama3-8b, smollm2-135m, ...), HF model dir or config.json",
    )
    m.add_argument(
        "--formula",
        choices=("detailed", "seed"),
        default="detailed",
        help="seed: the seed's 16N + s·b·d·L·k table for LLaMA-7B/13B/70B",
    )
    m.add_argument("--batch", type=int, default=1, help="micro-batch size")
    m.add_argument("--seq", type=int, default=2048, help="sequence length")
    m.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16-mixed",
        help="the config's names: bf16-mixed (fp32 weights + bf16 autocast), bf16 (pure bf16, stochastic "
        "rounding), fp32; bf16-master (bf16 weights + fp32 master: ZeRO/DeepSpeed's 16N layout) "
        "for comparison only",
    )
    m.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    m.add_argument("--fp32-grads", action="store_true", help="mixed precision with fp32 gradients")
    m.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    m.add_argument(
        "--in-backward", action="store_true", help="optimizer step in backward: one gradient alive at a time"
    )
    m.add_argument("--activation-offload", action="store_true", help="CUDA: saved activations in pinned CPU memory")
    m.add_argument("--cpu-offload", action="store_true", help="CUDA: optimiser state and gradients in CPU memory")
    m.add_argument("--gpus", type=int, default=1)
    m.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage over --gpus")
    m.add_argument("--method", choices=METHODS, default="full", help="full fine-tuning, or LoRA / QLoRA to compare")
    m.add_argument("--rank", type=int, default=16, help="LoRA rank")
    m.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="none",
        help="regularisation toward θ0: l2sp (or decay toward θ0) keeps a θ0 copy, ewc θ0 + its Fisher",
    )
    m.add_argument("--loss-fraction", type=float, default=1.0, help="share of positions with loss (SFT: < 1)")
    m.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    m.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb", help="GPU type for the fit / GPU count")
    m.add_argument(
        "--plot", metavar="PNG", help="draw the seed's stacked bars (full FT 7B, LoRA 7B, QLoRA 7B, QLoRA 70B)"
    )


def _plan_parser(sub) -> None:
    from fulltune.memory.report import GPUS

    p = sub.add_parser("plan", help="decide: full fine-tuning on one GPU, with ZeRO-3, with savers, or LoRA/QLoRA")
    p.add_argument("model", help="preset (llama-7b, llama-70b, smollm2-135m, ...), HF model dir or config.json")
    p.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb")
    p.add_argument("--gpus", type=int, default=1, help="how many GPUs you have")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument(
        "--precision",
        choices=("auto", "bf16-mixed", "bf16", "fp32"),
        default="auto",
        help="auto: what train.precision auto runs on these GPUs (bf16-mixed: every listed GPU has bf16)",
    )


def dispatch(args: argparse.Namespace) -> int:
    from fulltune.config import describe_fields, load_config

    if args.command in ("chat", "generate"):
        from fulltune import generate

        (generate.run_chat_command if args.command == "chat" else generate.run_generate_command)(args)
    elif args.command == "compare":
        from fulltune.compare_runs import run_compare_command

        run_compare_command(args)
    elif args.command == "report":
        from fulltune.report import run_report_command

        run_report_command(args)
    elif args.command == "interpolate":
        from fulltune.interpolate import run_interpolate_command

        run_interpolate_command(args)
    elif args.command == "eval":
        from fulltune.evals.compare import run_eval_command

        run_eval_command(args)
    elif args.command == "plan":
        from fulltune.memory.estimate import TrainSetup
        from fulltune.memory.plan import plan, render
        from fulltune.memory.spec import load_spec

        if args.gpus < 1 or args.batch < 1 or args.seq < 1:
            raise UserError("--gpus, --batch and --seq must be ≥ 1")
        precision = "bf16-mixed" if args.precision == "auto" else args.precision
        base = TrainSetup(micro_batch=args.batch, seq_len=args.seq, precision=precision)
        print(render(plan(load_spec(args.model), args.gpu, args.gpus, base)))
    elif args.command == "memory":
        from fulltune.memory.report import run_memory_command

        run_memory_command(args)
    elif args.command == "config":
        print(describe_fields())
    elif args.command == "verify":
        from fulltune.checkpoint import verify_command

        return verify_command([Path(p) for p in args.paths])
    elif args.command == "assets":
        from fulltune.assets import ensure_all

        ensure_all()
    elif args.command == "schedule":
        from fulltune.schedule_plot import run_schedule

        run_schedule(load_config(args.config, args.overrides), Path(args.out))
    elif args.command == "train":
        overrides = args.overrides + ([f"train.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)  # every config error before any model loads
        if args.nproc < 1:
            raise UserError("--nproc must be ≥ 1")
        if args.nproc > 1:
            from fulltune.distributed import launch

            return launch(args.nproc, ["train", args.config, *overrides])
        from fulltune.train import run_training

        run_training(cfg)
    return 0


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _lost_peers(exc: BaseException) -> bool:
    import torch.distributed as dist

    return "RANK" in os.environ and isinstance(exc, dist.DistError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data are local; never stall on a hub
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value overrides after an option (e.g. after --nproc 2)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports what every rank hit
    try:
        return dispatch(args)
    except UserError as exc:
        if main_rank or getattr(exc, "every_rank", False):
            print(f"fulltune: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if main_rank:
            print(f"fulltune: {exc}", file=sys.stderr)
        return exc.exit_code
    except OutOfMemory as exc:  # in a step: the breakdown and the planner's answer
        print(
            f"fulltune: error{'' if main_rank else ' on rank ' + os.environ.get('RANK', '?')}: {exc}", file=sys.stderr
        )
        return 3
    except Exception as exc:
        from fulltune.model import compile_failure

        if compile_failure(exc):
            if main_rank:
                print(
                    f"fulltune: error: train.compile: torch.compile failed ({compile_failure(exc)}); set "
                    "train.compile=false, or train.compile_fallback=true to run uncompiled",
                    file=sys.stderr,
                )
            return 2
        if _lost_peers(exc):  # another rank failed first and reported why
            print(f"fulltune: rank {os.environ.get('RANK')} stopped: another rank failed", file=sys.stderr)
            return 1
        if not _out_of_memory(exc):
            raise
        where = "" if main_rank else f" on rank {os.environ.get('RANK')}"
        print(
            f"fulltune: error{where}: out of memory; lower train.micro_batch_size or data.max_seq_len, or set "
            "model.activation_checkpointing=true (checkpoints already written are intact)",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        if not main_rank:
            return 130
        print(
            "fulltune: interrupted; the last checkpoint (if any) is intact — resume with train.resume=auto",
            file=sys.stderr,
        )
        return 130
    finally:
        if "fulltune.distributed" in sys.modules:  # a torchrun worker leaves its process group cleanly
            sys.modules["fulltune.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
