"""`fulltune plan MODEL`: the decision — full fine-tuning on one GPU, with ZeRO-3, with the memory
savers, or LoRA/QLoRA — with the numbers behind it, printed as `fulltune train` overrides."""

from __future__ import annotations

from fulltune.errors import UserError
from fulltune.memory.gpus import GPUS


def register(sub) -> None:

    p = sub.add_parser("plan", help="decide: full fine-tuning on one GPU, with ZeRO-3, with savers, or LoRA/QLoRA")
    p.add_argument("model", help="preset (llama-7b, llama-70b, smollm2-135m, ...), HF model dir or config.json")
    p.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb", help="the GPU type you have")
    p.add_argument("--gpus", type=int, default=1, help="how many GPUs you have")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16-mixed", "bf16", "fp32"),
        default="auto",
        help="auto: what train.precision auto runs on these GPUs (bf16-mixed: every listed GPU has bf16)",
    )
    p.set_defaults(run=run)


def run(args) -> None:
    from fulltune.memory.estimate import TrainSetup
    from fulltune.memory.plan import plan, render
    from fulltune.memory.spec import load_spec

    if args.gpus < 1 or args.batch < 1 or args.seq < 1:
        raise UserError("--gpus, --batch and --seq must be ≥ 1")
    precision = "bf16-mixed" if args.precision == "auto" else args.precision
    base = TrainSetup(micro_batch=args.batch, seq_len=args.seq, precision=precision)
    print(render(plan(load_spec(args.model), args.gpu, args.gpus, base)))
