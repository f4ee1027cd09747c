"""Inbox windows: every rank holds a full vector that any rank adds to and reads.

Gossip keeps each agent's *effective* model in one: the model it last published plus every
change peers delivered since. A pairwise exchange updates both sides without the peer taking
part: the caller reads the peer's effective model, moves its own by ``d`` and delivers ``-d``
to the peer; the peer folds what arrived into its model at its next exchange. Nothing
delivered is lost or counted twice, so the sum of all models never changes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._base import VectorPerRankWindow
from .relay import SUM

__all__ = ["InboxWindow"]


class InboxWindow(VectorPerRankWindow):
    """A vector of ``n`` floats per rank: anyone adds to it (:meth:`deliver`) and reads it
    (:meth:`read`), its owner empties it (:meth:`take`).

    Construction is collective (every rank of ``comm``, same ``n`` and ``dtype``) and
    blocking; every inbox starts at zero. Both operations are one-sided and element-wise
    atomic, and only ``SUM`` and ``NO_OP`` ever touch an inbox (MPI's ``same_op_no_op``):
    :meth:`take` reads the inbox and then subtracts what it read, so a delivery racing with
    it is kept for the next take, never lost.
    """

    def deliver(self, rank: int, values: np.ndarray) -> None:
        """Add ``values`` to ``rank``'s inbox.

        One-sided: ``rank`` does not take part. ``MPI_Accumulate(SUM)``, then ``Flush``:
        blocking until the addition is complete at ``rank``. Concurrent deliveries from any
        ranks are never lost."""
        if not 0 <= rank < self._nranks:
            raise ValueError(f"InboxWindow.deliver rank must be in [0, {self._nranks}); got {rank}")
        with self._lock:
            self._win()
            buf = self._checked("deliver values", values, self._n)
            self._accumulate(rank, 0, buf, SUM)
            self._complete(rank)

    def read(self, rank: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read ``rank``'s inbox into ``out`` (or a new array) and return it; nothing changes.

        One-sided: ``rank`` does not take part. ``MPI_Get_accumulate(NO_OP)``, blocking until
        the data has arrived; every element is whole (a delivery racing with the read is in
        an element entirely or not at all)."""
        return self._read_vector(rank, out)

    def take(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Empty this rank's inbox: return what it held (into ``out`` or a new array).

        One-sided, on this rank's own memory: ``Get_accumulate(NO_OP)`` reads every element
        whole, then ``Accumulate(SUM)`` of its negation removes exactly what was read; a
        delivery in between stays in the inbox for the next take."""
        with self._lock:  # re-entrant: held across the read and the subtraction
            out = self._read_vector(self._rank, out, "take")
            self._accumulate(self._rank, 0, np.negative(out), SUM)
            self._complete(self._rank)
            return out

    def __repr__(self) -> str:
        return f"InboxWindow(n={self._n}, dtype={self._dtype}{', closed' if self.closed else ''})"
