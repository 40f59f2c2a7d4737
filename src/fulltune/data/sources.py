"""Local data files → a `datasets.Dataset`, with errors that name the file and the line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from fulltune.errors import UserError, input_path

SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: a key given twice is refused (json.loads would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _duplicate_line(where: str, key: str) -> str:
    return f"{where}: duplicate key {key!r} in a JSON object (a reader keeps only its last value); remove one"


def iter_jsonl(path: Path):
    """(line number, object) for each non-blank line; the first malformed line is named in the error."""
    with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows editors) is not data
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({_json_problem(exc)})") from None
            except _DuplicateKey as exc:
                raise UserError(_duplicate_line(f"{path}:{lineno}", exc.key)) from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            yield lineno, row


def _json_problem(exc: json.JSONDecodeError) -> str:
    """json's message with the column; a control character (a raw tab, NUL, newline in a string) by its byte."""
    if exc.msg.startswith("Invalid control character"):
        return f"a raw control character {exc.doc[exc.pos]!r} inside a string at column {exc.colno}; escape it"
    return f"{exc.msg} at column {exc.colno}"


def _json_values(text: str, decoder: json.JSONDecoder):
    """Each JSON value in `text`: one document, or several one after another (JSON Lines in a .json)."""
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            return
        value, pos = decoder.raw_decode(text, pos)
        yield value


def _check_json(path: Path) -> int:
    """A .json file parses, with no key given twice in an object (named at its 1-based line)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        values = list(_json_values(text, json.JSONDecoder(object_pairs_hook=_unique_keys)))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({_json_problem(exc)})") from None
    except _DuplicateKey as exc:
        raise UserError(_duplicate_line(f"{path}:{_duplicate_at(text)}", exc.key)) from None
    return sum(len(v) if isinstance(v, list) else 1 for v in values)


def _duplicate_at(text: str) -> int:
    """The 1-based line where the first object holding a repeated key starts (json's pure-Python
    scanner, which knows positions; only run once the fast parse found a repeat)."""
    from json import decoder as jd
    from json import scanner

    class Found(Exception):
        pass

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        pairs, end = jd.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        if len({k for k, _ in pairs}) < len(pairs):
            raise Found(s_and_end[0].count("\n", 0, s_and_end[1]) + 1)
        return dict(pairs), end

    dec = json.JSONDecoder()
    dec.parse_object = parse_object
    dec.scan_once = scanner.py_make_scanner(dec)
    try:
        list(_json_values(text, dec))
    except Found as found:
        return found.args[0]
    return 1


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
    """Where record `index` (0-based) lives, for error messages: FILE:LINE (1-based) for JSONL and CSV,
    FILE (record N, 1-based) otherwise."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        with open(p, encoding="utf-8-sig") as fh:
            seen = -1
            for lineno, line in enumerate(fh, 1):
                seen += bool(line.strip())
                if seen == index:
                    return f"{p}:{lineno}"
    if p.suffix.lower() == ".csv":
        with contextlib.suppress(UserError, OSError, UnicodeDecodeError):
            starts = csv_lines(p)[1]
            if index < len(starts):
                return f"{p}:{starts[index]}"
    return f"{p} (record {index + 1})"


def csv_lines(path: Path) -> tuple[list[str], list[int]]:
    """(the header, the 1-based line where each record starts) of a CSV file, read with Python's csv
    module in strict mode: a quote that is never closed (which would swallow the following rows into
    one cell), text after a closing quote, more fields than the header and a column named twice are
    refused at their line. Blank lines are skipped, as pandas does."""
    import csv

    limit = csv.field_size_limit(2**31 - 1)  # long cells are data, not errors; restored below
    header, starts, start = None, [], 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" starts with a BOM
            reader = csv.reader(fh, strict=True)
            while True:
                try:
                    row = next(reader, None)
                except csv.Error as exc:
                    raise UserError(_csv_problem(path, start, reader.line_num, str(exc))) from None
                if row is None:
                    return header or [], starts
                if row and header is None:
                    header = _csv_header(path, start, row)
                elif row and len(row) > len(header):
                    raise UserError(
                        f"{path}:{start}: {len(row)} fields, but the header has {len(header)}; a cell "
                        "holding a comma must be in double quotes"
                    )
                elif row:
                    starts.append(start)
                start = reader.line_num + 1
    finally:
        csv.field_size_limit(limit)


def _csv_header(path: Path, line: int, row: list[str]) -> list[str]:
    twice = sorted({name for name in row if row.count(name) > 1})
    if twice:
        raise UserError(f"{path}:{line}: column {twice[0]!r} appears twice in the header; a reader keeps only one")
    return row


def _csv_problem(path: Path, start: int, line: int, what: str) -> str:
    if "unexpected end of data" in what:
        return (
            f"{path}:{start}: a quote opened in this record is never closed, so every row after it would be "
            'read as one cell; close it, or double a quote inside a quoted cell ("")'
        )
    if "expected after" in what and start < line:
        return (
            f"{path}:{start}: a quote opened in this record closes only on line {line}, where text follows it "
            f"({what}): an unmatched quote swallows the rows between; close it where the cell ends"
        )
    if "expected after" in what:
        return (
            f'{path}:{line}: text after a closing quote ({what}); inside a quoted cell write a quote as "", '
            "or quote the whole cell"
        )
    return f"{path}:{line}: not valid CSV ({what})"


def _csv_as_strings(header: list[str]) -> dict:
    """CSV cells stay strings: a numeric answer column is text, not int64."""
    from datasets import Features, Value

    features = Features({name: Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "encoding": "utf-8-sig"}


def _quietly(read):
    """read() with datasets' own error log off: a parser error is reported once, as our one line."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        return read()
    finally:
        ds_logging.set_verbosity(level)


def _load_file(p: Path):
    """A `datasets.Dataset` of one data file, after our own checks of its syntax (which name lines)."""
    from datasets import load_dataset

    builder = SUFFIX_BUILDER.get(p.suffix.lower())
    if builder is None:
        raise UserError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIX_BUILDER)})")
    records, extra = None, {}
    if p.stat().st_size == 0:
        records = 0
    elif p.suffix.lower() == ".jsonl":
        records = _check_jsonl(p)
    elif p.suffix.lower() == ".json":
        records = _check_json(p)
    elif builder == "csv":
        header, starts = csv_lines(p)
        if header and not starts:
            raise UserError(f"{p}: no records (only the header line)")
        records, extra = len(starts), _csv_as_strings(header)
    if records == 0:
        raise UserError(f"{p}: no records (the file is empty)")
    return _quietly(lambda: load_dataset(builder, data_files=str(p), split="train", **extra))


def load_records(path: str):
    """A `datasets.Dataset` of the records in a local file or save_to_disk directory."""
    from datasets import Dataset, load_from_disk

    p = input_path(Path(path).expanduser(), "data file")
    try:
        if p.is_dir():
            if not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
                raise UserError(f"{p}: a directory must be a datasets save_to_disk directory")
            ds = load_from_disk(str(p))
            if not isinstance(ds, Dataset):
                raise UserError(f"{p}: holds several splits ({', '.join(ds)}); point at one split's directory")
        else:
            ds = _load_file(p)
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
