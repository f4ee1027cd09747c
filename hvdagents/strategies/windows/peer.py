"""Peer windows: every rank publishes a full vector that any rank reads one-sidedly."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._base import VectorPerRankWindow
from .relay import REPLACE

__all__ = ["PeerWindow"]


class PeerWindow(VectorPerRankWindow):
    """Every rank holds a full vector of ``n`` floats that it alone publishes and anyone reads.

    Construction is collective (every rank of ``comm``, same ``n`` and ``dtype``) and
    blocking; every vector starts at zero. :meth:`publish` and :meth:`read` are one-sided:
    an agent publishes its parameters while peers read them, element-wise atomically (a
    read may mix two publications, element by element, but never tears an element).
    """

    def publish(self, values: np.ndarray) -> None:
        """Overwrite this rank's vector with ``values``.

        One-sided and local to this rank's window (``Accumulate(REPLACE)`` on itself, then
        ``Flush``); blocking until the values are visible to every later :meth:`read`.
        """
        with self._lock:
            self._win()
            buf = self._checked("publish values", values, self._n)
            self._accumulate(self._rank, 0, buf, REPLACE)
            self._complete(self._rank)

    def read(self, rank: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read ``rank``'s published vector into ``out`` (or a new array) and return it.

        One-sided: ``rank`` does not take part. ``MPI_Get_accumulate(NO_OP)``, blocking
        until the data has arrived; every element is a whole published value.
        """
        return self._read_vector(rank, out)

    def __repr__(self) -> str:
        return f"PeerWindow(n={self._n}, dtype={self._dtype}{', closed' if self.closed else ''})"
