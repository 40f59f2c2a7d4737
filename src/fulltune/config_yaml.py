"""Reading a config's text: the YAML file and the key=value overrides, each problem as one line
naming the file and its 1-based line, or the override. A key written twice in one mapping is refused
(YAML itself keeps the last one silently)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fulltune.errors import UserError, path_problem


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1` → ("a.b", 1); values are parsed as YAML scalars/lists."""
    pairs = []
    for item in overrides:
        key, _, text = item.partition("=")
        if "=" not in item or not all(part.strip() for part in key.split(".")):
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-5")
        try:
            value = _safe_load(text, f"override {item!r}", lines=False) if text != "" else ""
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML (quote it, e.g. {key}='{text}')") from None
        pairs.append((key.strip(), value))
    return pairs


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line at file:line:column."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML ({what}" + (f", {context}" if context else "") + ")"


def _safe_load(text: str, where: str, lines: bool = True) -> Any:
    """yaml.safe_load, refusing a key given twice in one mapping: YAML keeps the last, so an `optim:`
    section written twice would silently drop the first one's settings. `where` starts the message
    (FILE, then its 1-based line; or the override, with `lines` off)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        for key_node, first in _duplicate_keys(node, "", set()) if node is not None else ():
            at = f"{where}:{key_node.start_mark.line + 1}" if lines else where
            raise UserError(
                f"{at}: duplicate key {first[0]!r}"
                + (f" (first on line {first[1]})" if lines else "")
                + "; YAML would keep only the last one and silently drop the first: merge the two"
            )
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _duplicate_keys(node: yaml.Node, prefix: str, visited: set):
    """(the repeated key's node, (its dotted name, the 1-based line of its first occurrence)) for each
    key given twice in a mapping, anywhere in the document. Each node is visited once: aliases may
    repeat a node (a "billion laughs" document repeats one a billion times) or nest it in itself."""
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen and key != "<<":
                yield key_node, (prefix + key, seen[key])
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
            yield from _duplicate_keys(value_node, f"{prefix}{key}.", visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item, prefix, visited)


def read_yaml(path: Path) -> dict:
    """The config file as a mapping; each way it can be unreadable as one line naming it."""
    problem = path_problem(path)
    if problem:
        raise UserError(f"config file {problem}")
    if path.is_dir():
        raise UserError(f"config file {path}: is a directory; name the YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = _safe_load(path.read_text(encoding="utf-8"), str(path)) or {}
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error(path, exc)) from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 (byte {exc.object[exc.start]:#04x}); save the file as UTF-8"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return raw
