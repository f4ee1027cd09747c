"""A rank-0-only CSV metrics log: one row per ``log(...)`` call, readable while training runs.

::

    with MetricsLog("runs/digits.csv", is_root=ctx.is_root) as log:
        for epoch in range(epochs):
            ...
            log.log(epoch=epoch, step=step, loss=loss, accuracy=acc)

- The header is the first row's keys, in order. Later rows may leave keys out (empty cells)
  but may not bring new ones (``ValueError``: decide the columns up front).
- Each row is written as one line and flushed at once, so a crash loses at most the row
  being written and ``python -m hvdagents plot`` can read the file mid-run.
- ``append=True`` (for a resumed run) keeps an existing file and its header; otherwise the
  file is started afresh.
- On every rank but the root, nothing is opened and ``log`` does nothing, so the same code
  runs on every rank. Purely local: no communication.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, TextIO

from .errors import ClosedError

__all__ = ["MetricsLog"]


class MetricsLog:
    """Append rows of metrics to a CSV file on the root rank only.

    ``path``: the CSV file (parent directories are created). ``is_root``: whether this process
    writes (pass ``ctx.is_root``). ``append``: continue an existing file, keeping its header.
    """

    def __init__(self, path: str | os.PathLike, *, is_root: bool, append: bool = False) -> None:
        self.path = Path(path)
        self.is_root = bool(is_root)
        self.fields: list[str] | None = None
        self._file: TextIO | None = None
        self._closed = False
        if not self.is_root:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), None)
            self.fields = list(header) if header else None
            self._file = open(self.path, "a", newline="")
        else:
            self._file = open(self.path, "w", newline="")

    def log(self, **row: Any) -> None:
        """Write one row (``None`` values become empty cells). Local; a no-op off the root."""
        if self._closed:
            raise ClosedError(f"MetricsLog({str(self.path)!r}) is closed")
        if not self.is_root or self._file is None:
            return
        if self.fields is None:
            if not row:
                raise ValueError("MetricsLog.log needs at least one column; got none")
            self.fields = list(row)
            self._write(self.fields)
        unknown = [key for key in row if key not in self.fields]
        if unknown:
            raise ValueError(
                f"MetricsLog columns are fixed by the first row {self.fields}; got new "
                f"column(s) {unknown}. Log every column in the first row (None for empty)."
            )
        self._write(["" if row.get(key) is None else row[key] for key in self.fields])

    def _write(self, values: list[Any]) -> None:
        if self._file is None:
            return
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(values)
        self._file.write(line.getvalue())
        self._file.flush()

    def close(self) -> None:
        """Close the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
