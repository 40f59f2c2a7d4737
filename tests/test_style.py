"""The house rules that a reader can count, checked on src/: calls that pass more than four arguments
use keywords, functions stay within 60 lines, and train.py's loop and step each fit on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fulltune"
# Calls into other libraries whose signatures are theirs: json's decoder hook takes its arguments positionally.
FOREIGN = {"jd.JSONObject"}


def _trees():
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC.parent), ast.parse(path.read_text())


def test_calls_with_more_than_four_arguments_use_keywords():
    crowded = [
        f"{path}:{node.lineno}: {ast.unparse(node.func)}(...) with {len(node.args)} positional arguments"
        for path, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and len([a for a in node.args if not isinstance(a, ast.Starred)]) > 4
        and ast.unparse(node.func) not in FOREIGN
    ]
    assert crowded == []


def test_functions_stay_within_sixty_lines():
    long = [
        f"{path}:{node.lineno}: {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for path, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_the_loop_and_the_step_each_fit_on_one_screen():
    tree = ast.parse((SRC / "train.py").read_text())
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert sizes["loop"] <= 50 and sizes["train_step"] <= 50, sizes
