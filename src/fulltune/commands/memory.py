"""`fulltune memory [MODEL]`: the memory of a training setup per GPU, term by term; the seed's 16N
table (--formula seed); the stacked-bar plot (--plot)."""

from __future__ import annotations

from pathlib import Path

from fulltune.errors import UserError
from fulltune.memory.estimate import ANCHORS, METHODS, OPTIMIZERS, PRECISIONS
from fulltune.memory.gpus import GPUS


def register(sub) -> None:

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
    m.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimiser whose state is counted")
    m.add_argument("--fp32-grads", action="store_true", help="mixed precision with fp32 gradients")
    m.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    m.add_argument(
        "--in-backward", action="store_true", help="optimizer step in backward: one gradient alive at a time"
    )
    m.add_argument("--activation-offload", action="store_true", help="CUDA: saved activations in pinned CPU memory")
    m.add_argument("--cpu-offload", action="store_true", help="CUDA: optimiser state and gradients in CPU memory")
    m.add_argument("--gpus", type=int, default=1, help="GPUs the setup is spread over (with --zero)")
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
    m.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="where it trains (CUDA-only savers count on cuda)"
    )
    m.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb", help="GPU type for the fit / GPU count")
    m.add_argument(
        "--plot", metavar="PNG", help="draw the seed's stacked bars (full FT 7B, LoRA 7B, QLoRA 7B, QLoRA 70B)"
    )
    m.set_defaults(run=run)


def run(args) -> None:
    from fulltune.memory.estimate import TrainSetup, estimate
    from fulltune.memory.report import breakdown, fits_line, min_gpus_zero3, seed_table
    from fulltune.memory.spec import load_spec

    if args.plot:
        from fulltune.memory.plot import plot_setups

        plot_setups(Path(args.plot))
        print(f"wrote {args.plot}")
        return
    if args.formula == "seed":
        print(seed_table())
        return
    if args.batch < 1 or args.seq < 1 or args.gpus < 1 or not 0 < args.loss_fraction <= 1:
        raise UserError("--batch, --seq and --gpus must be ≥ 1 and --loss-fraction in (0, 1]")
    spec = load_spec(args.model)
    setup = TrainSetup(
        micro_batch=args.batch,
        seq_len=args.seq,
        precision=args.precision,
        optimizer=args.optimizer,
        fp32_grads=args.fp32_grads,
        activation_checkpointing=args.checkpointing,
        gpus=args.gpus,
        zero_stage=args.zero,
        method=args.method,
        lora_rank=args.rank,
        loss_fraction=args.loss_fraction,
        device=args.device,
        anchor=args.anchor,
        optimizer_in_backward=args.in_backward,
        activation_offload=args.activation_offload,
        cpu_offload=args.cpu_offload,
    )
    est = estimate(spec, setup)
    print(breakdown(est))
    print(fits_line(est, args.gpu))
    if args.method == "full":
        needed = min_gpus_zero3(spec, setup, args.gpu)
        name = GPUS[args.gpu][0]
        print(f"fewest {name} GPUs for this setup with ZeRO-3: {needed if needed else 'more than 1024'}")
