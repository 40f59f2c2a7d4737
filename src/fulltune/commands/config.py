"""`fulltune config`: every config key with its default, range and one-line meaning."""

from __future__ import annotations


def register(sub) -> None:
    sub.add_parser("config", help="list every config key with its default and meaning").set_defaults(run=run)


def run(args) -> None:
    from fulltune.config import describe_fields

    print(describe_fields())
