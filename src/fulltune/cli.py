"""The `fulltune` command: parses argv, dispatches to the verb's module in fulltune/commands/, and turns the
errors a user can cause into one `fulltune: error:` line (exit 2; 3 for out of memory)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing

from fulltune.commands import VERBS
from fulltune.errors import Interrupted, OutOfMemory, UserError


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors said as one `fulltune: error:` line naming the verb (argparse
    prints the usage, then "fulltune train: error: ..."); --help is argparse's own. The verbs'
    parsers are made by add_subparsers, which uses this class too."""

    def error(self, message: str) -> typing.NoReturn:
        verb = self.prog.removeprefix("fulltune").strip()
        if message == "the following arguments are required: command":
            message = "no verb given (one of " + ", ".join(verb_parsers(self)) + ")"
        self.exit(
            2,
            f"fulltune: error: {verb + ': ' if verb else ''}{message} (see fulltune {verb + ' ' * bool(verb)}--help)\n",
        )


def parser() -> Parser:
    """The whole command line: `fulltune VERB ...`, one subparser per verb module."""
    p = Parser(prog="fulltune", description="Full fine-tuning of pre-trained causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"fulltune.commands.{verb}").register(sub)
    return p


def verb_parsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each verb's parser by name (chat and generate come from one module)."""
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parse(p: Parser, argv: list[str] | None) -> argparse.Namespace:
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value overrides after an option (e.g. after --nproc 2)
    elif extra:
        verb_parsers(p)[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def dispatch(args: argparse.Namespace) -> int:
    return args.run(args) or 0


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _lost_peers(exc: BaseException) -> bool:
    import torch.distributed as dist

    return "RANK" in os.environ and isinstance(exc, dist.DistError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data are local; never stall on a hub
    try:
        args = _parse(parser(), argv)
    except SystemExit as exc:  # --help (0) or a usage error, already said in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
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
