"""Directories that appear whole or not at all: write into a temp dir beside, then rename.

With `manifest=True` (checkpoints and the exported model) every file is fsync'ed, then a manifest
of every file's size and sha256 is written last (`fulltune-manifest.json`), then the directory is
fsync'ed, renamed into place, and its parent fsync'ed. `verify_dir` reads it back: a directory
whose manifest is missing, or whose files differ from it, is damaged (a torn write, a full disk,
a bit flip, someone's edit), and resume skips it for the previous good checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fulltune.errors import UserError

MANIFEST = "fulltune-manifest.json"


def write_dir_atomically(
    final: Path, write: Callable[[Path], None], manifest: bool = False, needed: int = 0, hashed: dict | None = None
) -> Path:
    """Call write(tmp) on a fresh temp directory next to `final`, then move it into place.

    A crash or error leaves whatever was at `final` before untouched (the temp dir is removed). A
    full disk or an unwritable directory is one UserError naming the path (`needed`: the bytes the
    write is expected to take, for the message). `hashed`: manifest entries that write() filled in
    for files someone else already fsynced and hashed (another rank's shards), taken as they are.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise UserError(write_failure(exc, final, needed) or f"{final}: cannot write ({exc})") from None
    try:
        return _write_and_rename(final, tmp, write, manifest=manifest, hashed=hashed)
    except Exception as exc:  # noqa: BLE001 — torch and safetensors report a full disk in their own types
        why = write_failure(exc, final, needed)
        if why is None:
            raise
        raise UserError(why) from None


def write_failure(exc: BaseException, where: Path, needed: int) -> str | None:
    """One line for a write that failed for lack of space or permission; None for anything else."""
    folder = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(exc) or (needed and free < needed):
        return (
            f"{where}: no space left on the device ({free / 1e9:.2f} GB free, about {needed / 1e9:.2f} GB needed); "
            "the previous checkpoint is intact: free some space, then resume with train.resume=auto"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or not os.access(folder, os.W_OK):
        return (
            f"{where}: not writable ({os.strerror(code) if code else 'permission denied'}); "
            "the previous checkpoint is intact"
        )
    return None


def _write_and_rename(final: Path, tmp: Path, write: Callable[[Path], None], *, manifest: bool, hashed) -> Path:
    old = final.with_name(f".{final.name}.old")
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp, hashed)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if manifest:
            _fsync(final.parent)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)  # interrupted between the two renames: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entry(path: Path) -> dict:
    """fsync a file, then its manifest entry: size and sha256."""
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, hashed: dict | None = None) -> None:
    """fsync every file, then record each one's size and sha256 in the manifest, written last.
    `hashed`: entries already made where the file was written (by file_entry), by relative path."""
    entries, hashed = {}, hashed or {}
    for path in _files(folder):
        name = str(path.relative_to(folder))
        if name in hashed:
            assert hashed[name]["bytes"] == path.stat().st_size, f"{name} changed after it was hashed"
            entries[name] = hashed[name]
        else:
            entries[name] = file_entry(path)
    target = folder / MANIFEST
    with open(target, "w") as fh:
        json.dump({"files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for sub in sorted({p.parent for p in _files(folder)} | {folder}, key=lambda p: -len(p.parts)):
        _fsync(sub)


def add_file(folder: Path, name: str, text: str) -> Path:
    """Put one more text file into a finished directory and its manifest (a model card into final/):
    the file written beside and renamed into place, then the manifest rewritten the same way, so a
    crash leaves the old manifest, which `verify` reports, never a half-written file it trusts."""
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    path, tmp = folder / name, folder / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    listed[name] = file_entry(path)
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"files": listed}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync(folder)
    return path


def verify_dir(folder: Path) -> str | None:
    """None if every file matches the manifest; else what is wrong, in a few words."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    if present != set(listed):
        missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
        return f"files differ from the manifest (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, entry in listed.items():
        path = folder / name
        if path.stat().st_size != entry["bytes"]:
            return f"{name}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{name}: sha256 differs from the manifest"
    return None
