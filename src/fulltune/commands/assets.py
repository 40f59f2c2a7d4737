"""`fulltune assets`: fetch and prepare the embedded default (SmolLM2-135M-Instruct, SST-2) once."""

from __future__ import annotations


def register(sub) -> None:
    sub.add_parser("assets", help="fetch and prepare the embedded default model and SST-2 task").set_defaults(run=run)


def run(args) -> None:
    from fulltune.assets import ensure_all

    ensure_all()
