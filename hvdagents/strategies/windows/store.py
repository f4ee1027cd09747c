"""The parameter store: one vector sharded over the ranks, pushed to and pulled one-sidedly."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ...data import shard_bounds
from ._base import Window, agree, check_vector_args, resolve_comm
from .relay import REPLACE, SUM

__all__ = ["ParameterWindow"]


class ParameterWindow(Window):
    """A vector of ``n`` floats in RMA window memory, sharded over the ranks of ``comm``.

    Construction is collective (every rank of ``comm``, same ``n`` and ``dtype``; checked,
    and a mistake raises the same error on every rank) and blocking; the vector starts at
    zero. Rank ``r`` holds elements ``shard_bounds(r)`` (``hvdagents.data.shard_bounds``:
    contiguous, the first ``n % size`` ranks one more; ranks beyond ``n`` hold none).
    ``comm`` defaults to ``hva.init().comm`` (``COMM_WORLD``).

    :meth:`push` and :meth:`pull` are one-sided: any rank calls them at any time, the ranks
    holding the shards do not take part. Pushes are element-wise atomic adds, so concurrent
    pushes from any number of ranks are never lost; a pull sees every element as a whole
    value: the initial value plus the pushes completed on it so far. Elements are atomic
    one by one, not the vector as a whole: a pull racing with a push may see some elements
    with it and some without.
    """

    def __init__(self, n: int, dtype: Any = np.float32, *, comm: Any = None) -> None:
        comm = resolve_comm(comm)
        problem, n, dt = check_vector_args("ParameterWindow", n, dtype)
        agree(comm, "ParameterWindow", problem, (n, None if dt is None else dt.str))
        self._n = n
        size = comm.Get_size()
        self._bounds = [shard_bounds(n, r, size) for r in range(size)]
        self._targets = [(r, lo, hi) for r, (lo, hi) in enumerate(self._bounds) if hi > lo]
        lo, hi = self._bounds[comm.Get_rank()]
        super().__init__(comm, hi - lo, dt)

    @property
    def size(self) -> int:
        """Number of elements ``n`` of the whole vector."""
        return self._n

    def shard_bounds(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of the elements held by ``rank`` (local; no communication)."""
        if not 0 <= rank < self._nranks:
            raise ValueError(f"rank must be in [0, {self._nranks}); got {rank}")
        return self._bounds[rank]

    def init(self, values: Optional[np.ndarray]) -> None:
        """Set the whole vector to rank 0's ``values``. Collective and blocking.

        Every rank of ``comm`` calls it; only rank 0's ``values`` are read (others may pass
        ``None``). Waits for every rank's earlier pushes, overwrites every shard, and returns
        on each rank only once all shards hold the new values. Bad values on rank 0 raise
        the same ``ValueError`` on every rank.
        """
        with self._lock:
            self._win()
            buf, problem = None, None
            if self._rank == 0:
                try:
                    buf = self._checked("init values", values, self._n)
                except ValueError as exc:
                    problem = str(exc)
            problem = self._comm.bcast(problem, root=0)
            if problem is not None:
                raise ValueError(problem if self._rank == 0 else f"{problem} (on rank 0)")
            self._comm.Barrier()  # pushes issued before init are complete before they are overwritten
            if buf is not None:
                for r, lo, hi in self._targets:
                    self._accumulate(r, 0, buf[lo:hi], REPLACE)
                self._complete()
            self._comm.Barrier()

    def push(self, delta: np.ndarray) -> None:
        """Add ``delta`` (1-D, ``n`` elements, the window's dtype) to the stored vector.

        One-sided: only the calling rank takes part. ``MPI_Accumulate(SUM)`` into every
        shard, then ``Flush_all``: blocking until the add is complete at every target.
        Element-wise atomic; concurrent pushes from any ranks are never lost.
        """
        with self._lock:
            self._win()
            buf = self._checked("push delta", delta, self._n)
            for r, lo, hi in self._targets:
                self._accumulate(r, 0, buf[lo:hi], SUM)
            self._complete()

    def pull(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read the stored vector into ``out`` (or a new array) and return it.

        One-sided: only the calling rank takes part; blocking until the data has arrived.
        ``MPI_Get_accumulate(NO_OP)`` from every shard: each element is a whole value (never
        torn by a concurrent push) that includes every push completed before the pull began.
        """
        with self._lock:
            self._win()
            out = self._output("pull out", out, self._n)
            for r, lo, hi in self._targets:
                self._read(r, 0, out[lo:hi])
            self._complete()
            return out

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._nranks} shards"
        return f"ParameterWindow(n={self._n}, dtype={self._dtype}, {state})"
