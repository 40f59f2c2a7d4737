"""Local data files → a `datasets.Dataset`, with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from fulltune.errors import UserError

SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def iter_jsonl(path: Path):
    """(line number, object) for each non-blank line; the first malformed line is named in the error."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield lineno, row


def _check_jsonl(path: Path) -> int:
    """Count records, failing on the first malformed line (datasets' own error does not name it)."""
    return sum(1 for _ in iter_jsonl(path))


def _not_utf8(path: Path) -> str:
    """Where a file stops being UTF-8, as file:line (column in bytes)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return f"{path}:{line}: not UTF-8 (byte {data[exc.start]:#04x} at column {column}); save the file as UTF-8"
    return f"{path}: not UTF-8"


def row_location(path: str, index: int) -> str:
    """Where record `index` lives, for error messages: file:line for JSONL/CSV, file row N otherwise."""
    p = Path(path)
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            seen = -1
            for lineno, line in enumerate(fh, 1):
                seen += bool(line.strip())
                if seen == index:
                    return f"{p}:{lineno}"
    if p.suffix == ".csv":
        return f"{p} (CSV record {index + 1})"  # quoted fields may span lines: no line number
    return f"{p} (record {index})"


def _csv_as_strings(path: Path) -> dict:
    """CSV cells stay strings: a numeric answer column is text, not int64."""
    import csv

    from datasets import Features, Value

    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def _quietly(read):
    """read() with datasets' own error log off: a parser error is reported once, as our one line."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        return read()
    finally:
        ds_logging.set_verbosity(level)


def load_records(path: str):
    """A `datasets.Dataset` of the records in a local file or save_to_disk directory."""
    from datasets import Dataset, load_dataset, load_from_disk

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    try:
        if p.is_dir():
            if not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
                raise UserError(f"{p}: a directory must be a datasets save_to_disk directory")
            ds = load_from_disk(str(p))
            if not isinstance(ds, Dataset):
                raise UserError(f"{p}: holds several splits ({', '.join(ds)}); point at one split's directory")
        else:
            builder = SUFFIX_BUILDER.get(p.suffix)
            if builder is None:
                raise UserError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIX_BUILDER)})")
            if p.stat().st_size == 0 or (p.suffix == ".jsonl" and _check_jsonl(p) == 0):
                raise UserError(f"{p}: no records (the file is empty)")
            extra = _csv_as_strings(p) if builder == "csv" else {}
            ds = _quietly(lambda: load_dataset(builder, data_files=str(p), split="train", **extra))
    except UserError:
        raise
    except Exception as exc:  # datasets wraps parser errors in many types; keep the file name
        cause = exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise UserError(_not_utf8(p)) from None
        raise UserError(f"{p}: could not read records: {type(cause).__name__}: {str(cause)[:300]}") from None
    if len(ds) == 0:
        raise UserError(f"{p}: no records")
    return ds
