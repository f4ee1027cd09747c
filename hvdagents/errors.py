"""Exception types raised by hvdagents.

Every misuse error is one of these, so users can catch them by type; none is an
``AssertionError`` or a bare ``Exception``.
"""

from __future__ import annotations

__all__ = [
    "HvdAgentsError",
    "LauncherError",
    "OneSidedUnavailableError",
    "ThreadLevelError",
    "ModelMismatchError",
    "ClosedError",
    "UsageError",
]


class HvdAgentsError(RuntimeError):
    """Base class of runtime errors raised by hvdagents."""


class LauncherError(HvdAgentsError):
    """The job was launched in a way that cannot work (the message names the fix)."""


class OneSidedUnavailableError(LauncherError):
    """This MPI cannot do the windows' one-sided operations between the job's nodes without
    failing or losing updates (the message names what failed and the fixes)."""


class ThreadLevelError(HvdAgentsError):
    """The MPI library granted less than ``MPI_THREAD_MULTIPLE``."""


class ModelMismatchError(ValueError):
    """Ranks hold models that differ in parameter names, shapes or dtypes."""


class ClosedError(HvdAgentsError):
    """An operation was attempted on a closed agent or parameter window."""


class UsageError(HvdAgentsError):
    """Methods were called in an order that cannot work (the message explains the order)."""
