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
    "NonFiniteError",
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


class NonFiniteError(ValueError):
    """An agent was about to share (or step with) a NaN or an infinity; nothing was applied.

    Asynchronous strategies: raised on the pushing rank before any window changes (the centre,
    or a peer's model, would hold the value for every agent from then on). ``Sync(nonfinite=
    "raise")``: raised on every rank alike before an optimizer step on a non-finite averaged
    gradient. The message names the strategy, the step and the first non-finite parameter;
    uncaught, it ends the job like any exception."""

    #: What happened instead (the asynchronous strategies' refusal; ``Sync`` says its own).
    REFUSED = "it was refused before anything was written, so the shared model is still finite"

    def __init__(self, strategy: str, parameter: str, value: float, what: str, step: int | None = None,
                 outcome: str = REFUSED) -> None:
        super().__init__(strategy, parameter, value, what, step, outcome)
        self.strategy, self.parameter, self.value, self.what, self.step = strategy, parameter, value, what, step
        self.outcome = outcome

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return (
            f"{self.strategy}{at}: {self.what} holds a non-finite value ({self.value!r}) in parameter "
            f"{self.parameter!r}; {self.outcome}. Find where the loss or gradients became NaN/Inf (a learning rate "
            "too high, a log of zero, float16 overflow), or clip the gradients."
        )
