"""Clock windows: one step counter per rank, for bounded staleness and update counts."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np

from ...errors import UsageError
from ._base import Window, resolve_comm
from .relay import REPLACE

__all__ = ["ClockWindow", "RETIRED", "CLOCK_HOME", "parked_value"]

#: Clock value of a retired agent: larger than any step count, ignored by waits.
RETIRED = int(np.iinfo(np.int64).max)



def parked_value(clock: int) -> int:
    """What a rank parked at ``clock`` (:meth:`ClockWindow.park`) shows: ``-(clock + 1)``,
    negative, so no step count is mistaken for it."""
    return -(clock + 1)


#: The rank whose window memory holds every agent's clock.
CLOCK_HOME = 0

#: Back-off of :meth:`ClockWindow.wait_until_within`: first sleep, growth factor, longest sleep.
BACKOFF_FIRST_S = 50e-6
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 10e-3


class ClockWindow(Window):
    """One int64 step counter per rank, all held in rank 0's window memory (bounded staleness).

    Construction is collective and blocking; every clock starts at 0. Each rank advances only
    its own clock (:meth:`tick`, ``Fetch_and_op``), reads all of them (:meth:`clocks`),
    and waits for the slowest (:meth:`wait_until_within`). All one-sided: rank 0 takes no
    part beyond holding the memory. :meth:`retire` takes a finished agent out of the count,
    so it never holds the others back.
    """

    def __init__(self, *, comm: Any = None) -> None:
        comm = resolve_comm(comm)
        self._clock = 0
        self._retired = False
        self._parked = False
        self._min_seen = 0  # lower bound of the slowest active clock (clocks only grow)
        count = comm.Get_size() if comm.Get_rank() == CLOCK_HOME else 0
        super().__init__(comm, count, np.dtype(np.int64))

    @property
    def clock(self) -> int:
        """This rank's clock as of its last :meth:`tick` (local; no communication)."""
        return self._clock

    @property
    def retired(self) -> bool:
        """Whether this rank has called :meth:`retire` (local)."""
        return self._retired

    def tick(self) -> int:
        """Advance this rank's clock by one and return the new value.

        One-sided (atomic ``Fetch_and_op(SUM)`` on rank 0's memory, then ``Flush``); blocking
        until the new value is visible to every rank.
        """
        with self._lock:
            self._win()
            if self._retired:
                raise UsageError(
                    "ClockWindow.tick() was called after retire(): a retired clock no longer counts"
                )
            if self._parked:
                raise UsageError("ClockWindow.tick() was called between park() and unpark()")
            one = np.ones(1, np.int64)
            before = np.zeros(1, np.int64)
            self._fetch_add(CLOCK_HOME, self._rank, one, before)
            self._complete(CLOCK_HOME)
            self._clock = int(before[0]) + 1
            return self._clock

    def clocks(self) -> np.ndarray:
        """Every rank's clock, indexed by rank (:data:`RETIRED` for retired ones,
        :func:`parked_value` for parked ones).

        One-sided ``MPI_Get_accumulate(NO_OP)`` from rank 0, then ``Flush`` (which also drives
        passive-target progress); blocking. Each clock is a whole value, at least as recent
        as the last tick its owner completed before this read began.
        """
        with self._lock:
            self._win()
            out = np.empty(self._nranks, np.int64)
            self._read(CLOCK_HOME, 0, out)
            self._complete(CLOCK_HOME)
            return out

    def retire(self) -> None:
        """Set this rank's clock to :data:`RETIRED`: waits on other ranks stop counting it.

        One-sided (``Accumulate(REPLACE)`` on rank 0's memory, then ``Flush``); blocking.
        Idempotent. Call it when an agent stops stepping, before any collective that the
        other ranks may only reach after more steps.
        """
        with self._lock:
            self._win()
            if self._retired:
                return
            sentinel = np.full(1, RETIRED, np.int64)
            self._accumulate(CLOCK_HOME, self._rank, sentinel, REPLACE)
            self._complete(CLOCK_HOME)
            self._retired = True

    def park(self) -> None:
        """Mark this rank as waiting in a collective (until :meth:`unpark`): it cannot tick
        before every rank reaches that collective, so waits on other ranks do not wait for it
        (they could never end). Its clock is not lost: :meth:`unpark` puts it back.

        One-sided (``Accumulate(REPLACE)`` on rank 0's memory, then ``Flush``); blocking.
        Does nothing on a retired clock."""
        self._set_parked(True)

    def unpark(self) -> None:
        """End :meth:`park`: this rank's clock counts again. One-sided, blocking."""
        self._set_parked(False)

    def _set_parked(self, parked: bool) -> None:
        with self._lock:
            self._win()
            if self._retired or self._parked == parked:
                return
            value = np.full(1, parked_value(self._clock) if parked else self._clock, np.int64)
            self._accumulate(CLOCK_HOME, self._rank, value, REPLACE)
            self._complete(CLOCK_HOME)
            self._parked = parked

    def wait_until_within(self, staleness: int, *, timeout: Optional[float] = None) -> None:
        """Block while this rank's clock is more than ``staleness`` ahead of the slowest active one.

        One-sided and local to the caller: polls :meth:`clocks` (each poll flushes, which
        drives passive-target progress), sleeping between polls from ``BACKOFF_FIRST_S``
        growing to ``BACKOFF_MAX_S``. Returns at once when a retired rank calls it, or when
        every other rank has retired; parked ranks (:meth:`park`) are not waited for.
        ``timeout`` (seconds): raise ``TimeoutError`` instead
        of waiting longer.
        """
        if isinstance(staleness, bool) or not isinstance(staleness, (int, np.integer)):
            raise TypeError(f"staleness must be an int; got {type(staleness).__name__} {staleness!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0; got {staleness}")
        self._win()
        if self._retired or self._clock - self._min_seen <= staleness:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = BACKOFF_FIRST_S
        while True:
            values = self.clocks()
            active = values[values != RETIRED]
            running = active[active >= 0]  # the others are parked: waiting in a collective
            slowest = int(running.min()) if running.size else RETIRED
            if running.size == active.size:  # a parked clock comes back: not a lower bound
                self._min_seen = slowest
            if self._clock - slowest <= staleness:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"rank {self._rank} at clock {self._clock} waited {timeout} s for the slowest "
                    f"rank (clock {slowest}) to come within {staleness} steps"
                )
            time.sleep(delay)
            delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX_S)

    def __repr__(self) -> str:
        flags = ", retired" * self._retired + ", parked" * self._parked + ", closed" * self.closed
        return f"ClockWindow(clock={self._clock}{flags})"
