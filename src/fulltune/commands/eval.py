"""`fulltune eval MODEL [MODEL_B]`: score general-skill probes on one model, or compare two (θ0 vs θ*) on
the same items, paired. The JSON keeps each item's outcome (`items`)."""

from __future__ import annotations

import json
from pathlib import Path

from fulltune.commands import add_precision

DEFAULT_PROBES = "arc_easy,piqa,sciq,humaneval,mbpp"


def register(sub) -> None:
    e = sub.add_parser("eval", help="score general-skill probes on a model, or compare two models")
    e.add_argument("models", nargs="+", metavar="MODEL", help="HF model dir, .gguf or 'default'; two to compare")
    e.add_argument(
        "--probes",
        default=DEFAULT_PROBES,
        help=f"comma-separated (default {DEFAULT_PROBES}); mc:FILE.jsonl / text:FILE.jsonl for your own",
    )
    e.add_argument("--items", type=int, default=50, help="items per multiple-choice probe")
    e.add_argument("--code-items", type=int, default=30, help="items per code / text probe")
    e.add_argument("--batch-size", type=int, default=16, help="rows per forward pass when scoring")
    add_precision(e)
    e.add_argument("--out", default="fulltune-eval.json", help="where to save the scores (JSON)")
    e.set_defaults(run=run)


def _row(name: str, summaries: list[dict], change: dict | None) -> str:
    """One probe: each model's score with its own standard error; with two models, the paired change
    on the same items with its 95 % interval, p and verdict (evals/paired.py)."""
    from fulltune.evals.forgetting import describe_change

    if summaries[0]["kind"] == "mc":
        cells = [f"{100 * s['acc']:6.1f}% ±{100 * s['acc_stderr']:.1f}" for s in summaries]
        metric = "acc"
    else:
        cells = [f"{s['nll_per_token']:7.3f} ({s['bits_per_byte']:.3f} bpb)" for s in summaries]
        metric = "NLL/token"
    return (
        f"{name:<12} {metric:<10} "
        + "  ".join(f"{c:>22}" for c in cells)
        + (f"  {describe_change(change)}" if change else "")
    )


def run(args) -> None:
    import torch

    from fulltune.config import ModelConfig
    from fulltune.errors import UserError
    from fulltune.evals.forgetting import ProbeSet, forgetting_report
    from fulltune.evals.records import split
    from fulltune.model import load_theta0
    from fulltune.runtime import autocast_factory, pick_device, resolve_precision

    if len(args.models) > 2:
        raise UserError("fulltune eval takes one model, or two to compare")
    if args.items < 1 or args.code_items < 1 or args.batch_size < 1:
        raise UserError("--items, --code-items and --batch-size must be ≥ 1")
    names = [n.strip() for n in args.probes.split(",") if n.strip()]
    device = pick_device("auto")
    autocast = autocast_factory(resolve_precision(args.precision, device), device)
    results = {}
    for path in args.models:
        model, tokenizer, _ = load_theta0(ModelConfig(path=path))
        model.to(device).eval()
        probes = ProbeSet(names, tokenizer, args.items, args.code_items)
        with torch.no_grad():
            results[path] = probes.run(model, autocast, args.batch_size, progress=True)
        print(f"[eval] {path}: probes took {results[path]['_seconds']:.0f} s", flush=True)
        del model
    changes = {}
    if len(args.models) == 2:
        (a, items_a), (b, items_b) = (split(results[m]) for m in args.models)
        changes = forgetting_report(a, b, (items_a, items_b))["probes"]
    header = f"{'probe':<12} {'metric':<10} " + "  ".join(f"{Path(m).name or m:>22}" for m in args.models)
    print(header + ("  change, paired on the same items [95 % interval]" if changes else ""))
    for name in (n for n in results[args.models[0]] if not n.startswith("_")):
        print(_row(name, [results[m][name] for m in args.models], changes.get(name)))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"[eval] saved {args.out}")
