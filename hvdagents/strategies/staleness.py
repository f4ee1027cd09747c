"""Bounded staleness (Stale Synchronous Parallel) as a wrapper around any runner.

With ``max_staleness=s`` every step ticks this agent's clock in a
:class:`~.windows.ClockWindow`, and no agent starts a step while it is more than ``s`` steps
ahead of the slowest active agent. An agent that finishes retires its clock first, so a
finished agent never holds the others back.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .base import ParameterAccess, Runner, RunnerState
from .weak import mpi_world_comm
from .windows import ClockWindow

__all__ = ["StalenessBound"]


class StalenessBound(Runner):
    """``inner``, with no agent more than ``max_staleness`` steps ahead of the slowest.

    ``start``/``finish`` are collective as ``inner``'s are; ``after_step`` adds a one-sided
    clock tick and, while this agent is too far ahead, a one-sided wait."""

    def __init__(self, inner: Runner, max_staleness: int) -> None:
        self.inner = inner  # first: Runner.__init__ sets ``state``, which is inner's
        super().__init__(inner.strategy)
        self.max_staleness = max_staleness
        self.clock: Optional[ClockWindow] = None

    @property
    def uses_horovod(self) -> bool:  # type: ignore[override]
        return self.inner.uses_horovod

    @property
    def state(self) -> RunnerState:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: RunnerState) -> None:
        self.inner.state = value

    def start(self, params: ParameterAccess) -> None:
        """Collective: start ``inner``, then the clocks (so a refused start leaves no window)."""
        self.inner.start(params)
        self.clock = ClockWindow(comm=mpi_world_comm())

    def after_step(self, params: ParameterAccess) -> None:
        """Tick, wait while more than ``max_staleness`` ahead of the slowest, then ``inner``."""
        if self.clock is not None:
            self.clock.tick()
            self.clock.wait_until_within(self.max_staleness)
        self.inner.after_step(params)

    def reseed(self, params: ParameterAccess) -> None:
        self.inner.reseed(params)

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        self.inner.restore(params, saved)

    def snapshot(self) -> Optional[np.ndarray]:
        return self.inner.snapshot()

    def finish(self, params: ParameterAccess) -> None:
        """Retire this agent's clock (agents still training are not held back), then
        ``inner``'s collective finish, then free the clocks."""
        if self.clock is not None:
            self.clock.retire()
        self.inner.finish(params)
        if self.clock is not None:
            self.clock.close()
            self.clock = None
