"""Directories that appear whole or not at all: write into a temp dir beside, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temp directory next to `final`, then move it into place.

    A crash or error leaves whatever was at `final` before untouched (the temp dir is removed).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)  # interrupted between the two renames: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final
