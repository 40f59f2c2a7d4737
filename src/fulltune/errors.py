"""The one exception type for mistakes a user can fix: the CLI prints its message and exits 2."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UserError(Exception):
    """A bad input (file, line, config key, data) described in one clear message."""


class Interrupted(Exception):
    """The run stopped at the user's request (Ctrl-C, SIGTERM); exit 128 + the signal (130, 143)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class OutOfMemory(Exception):
    """A step ran out of device memory; the message has the estimate's breakdown and the planner's
    suggestion (memory/runcheck.out_of_memory_line). Exit 3."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def path_problem(path: Path) -> str | None:
    """What makes `path` unusable as an input file (or directory), said as what it is: a symlink loop,
    a dangling link, a FIFO, a device; None for a regular file, a directory, or a path that is simply
    missing (the caller says "not found" in its own words). Reading a FIFO would block, and
    `Path.exists()` calls a symlink loop simply missing."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symlink loop (following its links never reaches a file); point it at the real file"
        if exc.errno == errno.ENOTDIR:
            return f"{path}: not found (a part of the path is a file, not a directory)"
        if os.path.islink(path):
            return f"{path}: a dangling symlink (to {os.readlink(path)}, which does not exist)"
        if exc.errno == errno.EACCES:
            return f"{path}: permission denied"
        return None
    for test, kind in _KINDS:
        if test(info.st_mode):
            return f"{path}: is {kind}, not a regular file"
    return None


def input_path(path: Path, what: str) -> Path:
    """`path` if it is a file or directory to read; else one line naming `what` (e.g. "data file",
    "model.path") and what the path is: missing, a FIFO, a symlink loop, ..."""
    problem = path_problem(path)
    if problem:
        raise UserError(f"{what} {problem}")
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


def short(value) -> str:
    """repr(value) cut to a line: a config value may be a huge or deeply nested YAML structure (an alias
    "bomb" repeats one list a billion times), which a plain repr would spend minutes and gigabytes on."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = 80
    return r.repr(value)
