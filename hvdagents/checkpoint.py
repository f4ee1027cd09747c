"""Atomic checkpoint files: write to a temporary file beside the target, then rename.

A reader never sees a half-written checkpoint: either the old file or the new one. Only
rank 0 writes (the agents call this on rank 0 alone).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fileobj)`` on a temporary file in ``path``'s directory, fsync it, and
    rename it over ``path``. On any error the temporary file is removed and ``path`` is
    left as it was. Returns the final path. Local file I/O only: no communication."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target
