"""Quiet ranks: TensorFlow's start-up notices are printed by rank 0 alone.

TensorFlow writes a few notices to the process's standard error while it is imported, before
its own logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not hide them: absl's "All log
messages before absl::InitializeLog() is called are written to STDERR", oneDNN's "custom
operations are on" and the CPU feature guard's "This TensorFlow binary is optimized ...".
Every rank prints them, so a job of N ranks starts with N copies.

On the other ranks, :func:`quiet_tensorflow_import` (called by ``hva.init()``) wraps the
first ``import tensorflow`` through Python's import system (a ``sys.meta_path`` finder, the
documented extension point): while TensorFlow's module runs, file descriptor 2 goes to a
temporary file; afterwards every captured line that is not one of those notices is written
to the real standard error, in order, also when the import raises. Nothing else is touched:
errors, warnings and everything printed after the import reach the terminal as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from types import ModuleType
from typing import Any, Sequence

__all__ = ["quiet_tensorflow_import", "STARTUP_NOTICE"]

#: The lines TensorFlow prints at import on every rank (absl before its logging starts, oneDNN,
#: the CPU feature guard and its second line).
STARTUP_NOTICE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ (port|cpu_feature_guard)\.cc:\d+\] "
    r"|To enable the following instructions: .* rebuild TensorFlow)"
)


class _QuietLoader(importlib.abc.Loader):
    """Runs ``inner``'s module with file descriptor 2 captured, then forwards all but the
    start-up notices."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self._inner.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                        if not STARTUP_NOTICE.match(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, as the path finder would, with :class:`_QuietLoader`."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; and the lookup below must not find us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    """Hide TensorFlow's start-up notices when this process imports it (see the module's
    text). Local; does nothing when TensorFlow is already imported or the hook is in place."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())
