"""`fulltune verify DIR ...`: checkpoints and exported models read back against their manifests."""

from __future__ import annotations

from pathlib import Path

from fulltune.atomic import verify_dir
from fulltune.checkpoint import checkpoint_problem, list_checkpoints
from fulltune.errors import UserError


def register(sub) -> None:
    v = sub.add_parser("verify", help="check checkpoints or an exported model against their manifests (size, sha256)")
    v.add_argument(
        "paths", nargs="+", metavar="DIR", help="a checkpoint, a final/ directory, or a run directory (all of its)"
    )
    v.set_defaults(run=run)


def run(args) -> int:
    return verify([Path(p) for p in args.paths])


def verify(paths: list[Path]) -> int:
    """`fulltune verify DIR ...`: a line per checkpoint / final model; exit 0 if all verify, else 1."""
    targets = []
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p}: not a directory")
        inside = list_checkpoints(p) + ([p / "final"] if (p / "final").is_dir() else [])
        targets += inside or [p]
    bad = 0
    for path in targets:
        problem = checkpoint_problem(path) if (path / "trainer_state.json").is_file() else verify_dir(path)
        bad += problem is not None
        print(f"{path}: {'ok' if problem is None else 'DAMAGED: ' + problem}")
    return 1 if bad else 0
