"""Bounded staleness (Stale Synchronous Parallel) as a wrapper around any runner.

With ``max_staleness=s`` every step ticks this agent's clock in a
:class:`~.windows.ClockWindow`, and no agent starts a step while it is more than ``s`` steps
ahead of the slowest active agent. An agent that finishes retires its clock first, so a
finished agent never holds the others back.

A rank waiting in a collective cannot tick, and a rank ahead of it could wait for it forever:
with uneven shards the rank with fewer batches reaches an end-of-epoch collective while the
others, still inside their epoch, are more than ``max_staleness`` ahead. Inside
:func:`in_collective` a rank's clocks are parked, so nobody waits for them; hvdagents' own
collectives between steps (``PreemptionFlag.should_stop``) use it, and so should a
collective of your own in the training loop (an all-reduce of the epoch's loss).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

from .async_runner import mpi_world_comm
from .base import ParameterAccess, Runner, RunnerState
from .windows import ClockWindow

__all__ = ["StalenessBound", "in_collective"]

#: Bounds started and not yet finished in this process.
_RUNNING: weakref.WeakSet[StalenessBound] = weakref.WeakSet()


@contextmanager
def in_collective() -> Iterator[None]:
    """Local: park this rank's staleness clocks while the block runs (a collective every
    rank reaches, at different step counts), so no rank waits for this one meanwhile; the
    bound holds again after the block. One-sided clock writes at entry and exit; nothing
    without a ``max_staleness`` agent. The bound may be exceeded inside the block by as many
    steps as the ranks' step counts differ there."""
    clocks = [bound.clock for bound in list(_RUNNING) if bound.clock is not None]
    for clock in clocks:
        clock.park()
    try:
        yield
    finally:
        for clock in clocks:
            if not clock.closed:
                clock.unpark()


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
        _RUNNING.add(self)

    def after_step(self, params: ParameterAccess) -> None:
        """Tick, wait while more than ``max_staleness`` ahead of the slowest, then ``inner``."""
        if self.clock is not None:
            self.clock.tick()
            self.clock.wait_until_within(self.max_staleness)
        self.inner.after_step(params)

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        self.inner.restore(params, saved)

    def snapshot(self) -> Optional[np.ndarray]:
        return self.inner.snapshot()

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        return self.inner.snapshot_shape(num_parameters)

    def finish(self, params: ParameterAccess) -> None:
        """Retire this agent's clock (agents still training are not held back), then
        ``inner``'s collective finish, then free the clocks."""
        _RUNNING.discard(self)
        if self.clock is not None:
            self.clock.retire()
        self.inner.finish(params)
        if self.clock is not None:
            self.clock.close()
            self.clock = None
