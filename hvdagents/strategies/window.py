"""MPI one-sided windows for the asynchronous strategies: the parameter store and its companions.

Three window layouts share one lifecycle:

- :class:`ParameterWindow` — one vector *sharded* over all ranks: any rank adds to it
  (``push``, element-wise atomic) or reads it (``pull``) without the owners taking part.
  Downpour and EASGD keep their centre here.
- :class:`PeerWindow` — every rank holds a *full* vector that only it writes (``publish``)
  and that any rank reads (``read``). Gossip publishes each agent's parameters here.
- :class:`ClockWindow` — one int64 step counter per rank, for bounded staleness.

RMA rules followed throughout: memory comes from ``MPI.Win.Allocate``; every window is in
one passive-target epoch (``Lock_all``, shared, ``MODE_NOCHECK``) from construction to
:meth:`close`; writes are ``Accumulate``/``Fetch_and_op`` and reads that may race with them
are ``Get_accumulate(op=NO_OP)``, never plain ``Get``, so every element read is a whole
value; an operation returns after ``Flush`` (complete at the target). Only shared locks
exist, so no two ranks can deadlock on lock order. Concurrent operations on one location
only combine one op with ``NO_OP`` (MPI's default ``accumulate_ops=same_op_no_op``).

Freeing: ``close()`` is collective (``MPI_Win_free``). A collective free cannot run from
garbage collection, which happens at different moments on different ranks; so a window that
is dropped without ``close()`` is *not* freed by the collector (its ``__del__`` only emits a
``ResourceWarning``). Its MPI side stays registered here, and an ``atexit`` hook, registered
with the first window, frees every window still open in creation order before mpi4py
finalizes MPI. Every rank created its windows in the same collective order, so every rank
frees them in an order that cannot deadlock. A rank that dies of an exception does not get
there: :func:`hvdagents.init`'s abort hook ends the whole job first. mpi4py itself never
frees windows on collection either (it leaves that to ``Win.Free``).
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import warnings
from typing import Any, Optional, TypeVar

import numpy as np

from ..data import shard_bounds
from ..errors import ClosedError, LauncherError, UsageError

__all__ = ["ParameterWindow", "PeerWindow", "ClockWindow", "RETIRED", "SUPPORTED_DTYPES"]

#: Element types a parameter or peer window can hold.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Clock value of a retired agent: larger than any step count, ignored by waits.
RETIRED = int(np.iinfo(np.int64).max)

#: The rank whose window memory holds every agent's clock.
CLOCK_HOME = 0

#: Back-off of :meth:`ClockWindow.wait_until_within`: first sleep, growth factor, longest sleep.
BACKOFF_FIRST_S = 50e-6
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 10e-3


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


# --------------------------------------------------------------------------- lifecycle


class _Handle:
    """The MPI side of one window. Freed by ``close()`` or at interpreter exit, never by GC."""

    __slots__ = ("win", "key")

    def __init__(self, win: Any, key: int) -> None:
        self.win = win
        self.key = key

    def free(self) -> None:
        """Collective over the window's group: end the epoch and free the window."""
        win, self.win = self.win, None
        with _registry_lock:
            _live.pop(self.key, None)
        if win is None or _mpi().Is_finalized():
            return
        win.Unlock_all()
        win.Free()


_registry_lock = threading.Lock()
_live: dict[int, _Handle] = {}  # insertion order is creation order
_keys = itertools.count()
_atexit_registered = False


def _register(win: Any) -> _Handle:
    global _atexit_registered
    with _registry_lock:
        handle = _Handle(win, next(_keys))
        _live[handle.key] = handle
        if not _atexit_registered:
            # registered after mpi4py's import, so it runs before MPI_Finalize (Py_AtExit)
            atexit.register(_free_at_exit)
            _atexit_registered = True
    return handle


def _free_at_exit() -> None:
    """Free every window still open, in creation order (same collective order on all ranks)."""
    with _registry_lock:
        handles = list(_live.values())
    for handle in handles:
        handle.free()


def _resolve_comm(comm: Any) -> Any:
    if comm is None:
        from ..runtime import init

        ctx = init()
        if not ctx.mpi_world and ctx.size > 1:
            raise LauncherError(
                "RMA windows need an MPI world, and this job was started by 'horovodrun --gloo' "
                "(MPI sees a world of one). Launch with mpirun, srun --mpi=pmix, or horovodrun "
                "without --gloo."
            )
        return ctx.comm
    MPI = _mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intracommunicator; got {comm!r}")
    return comm


def _agree(comm: Any, owner: str, problem: Optional[tuple[str, str]], signature: tuple) -> None:
    """Collective: every rank raises the same error if any rank's arguments are bad or differ.

    Arguments are checked after one ``allgather``, so a mistake on one rank cannot leave the
    others waiting in the window's collective constructor.
    """
    gathered = comm.allgather((problem, signature))
    for rank, (bad, _) in enumerate(gathered):
        if bad is not None:
            kind, message = bad
            where = "" if rank == comm.Get_rank() else f" (on rank {rank})"
            raise (TypeError if kind == "TypeError" else ValueError)(message + where)
    if len({sig for _, sig in gathered}) > 1:
        listed = ", ".join(f"rank {r}: {sig}" for r, (_, sig) in enumerate(gathered))
        raise ValueError(f"{owner} must be created with the same arguments on every rank; got {listed}")


def _check_vector_args(owner: str, n: Any, dtype: Any) -> tuple[Optional[tuple[str, str]], int, Any]:
    """Local checks of (n, dtype); returns (problem or None, n, dtype)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        return ("TypeError", f"{owner} n must be an int; got {type(n).__name__} {n!r}"), 0, None
    if n < 1:
        return ("ValueError", f"{owner} n must be >= 1; got {n}"), 0, None
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in SUPPORTED_DTYPES:  # (`None in SUPPORTED_DTYPES` is True)
        return ("ValueError", f"{owner} dtype must be float32 or float64; got {dtype!r}"), 0, None
    return None, int(n), dt


_W = TypeVar("_W", bound="_Window")


class _Window:
    """Shared lifecycle: collective allocation, one ``Lock_all`` epoch, close, context manager.

    Calls on one window from several threads of a process are serialized by a lock.
    """

    def __init__(self, comm: Any, count: int, dtype: np.dtype) -> None:
        from mpi4py.util.dtlib import from_numpy_dtype

        MPI = _mpi()
        self._comm = comm
        self._rank = comm.Get_rank()
        self._nranks = comm.Get_size()
        self._dtype = np.dtype(dtype)
        self._mpitype = from_numpy_dtype(self._dtype)
        self._lock = threading.RLock()
        self._handle: Optional[_Handle] = None
        unit = self._dtype.itemsize
        win = MPI.Win.Allocate(count * unit, unit, comm=comm)
        win.Lock_all(MPI.MODE_NOCHECK)
        self._handle = _register(win)
        if count:
            # MPI_Win_allocate leaves memory undefined: start every element at zero
            win.Accumulate([np.zeros(count, self._dtype), self._mpitype], self._rank, op=MPI.REPLACE)
            win.Flush(self._rank)
        comm.Barrier()

    def _win(self) -> Any:
        handle = self._handle
        if handle is None or handle.win is None:
            raise ClosedError(f"{type(self).__name__} is closed")
        return handle.win

    @property
    def closed(self) -> bool:
        """Whether the window is freed, by :meth:`close` or at exit (local; no communication)."""
        return self._handle is None or self._handle.win is None

    @property
    def dtype(self) -> np.dtype:
        """Element type of the window."""
        return self._dtype

    @property
    def comm(self) -> Any:
        """The communicator the window spans."""
        return self._comm

    def close(self) -> None:
        """Free the window. Collective: every rank of ``comm`` must call it; blocking.

        Completes this rank's outstanding operations (``Unlock_all``), then ``MPI_Win_free``,
        which waits for every rank. Idempotent; any operation afterwards raises
        :class:`~hvdagents.errors.ClosedError`.
        """
        with self._lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                handle.free()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.win is not None:
            try:
                warnings.warn(
                    f"{type(self).__name__} was garbage-collected without close(); its MPI window "
                    "stays allocated until interpreter exit, where every rank frees it. Call "
                    "close() on every rank, or use it as a context manager.",
                    ResourceWarning,
                    stacklevel=2,
                )
            except Exception:  # interpreter shutting down: nothing left to warn with
                pass

    def _checked(self, what: str, values: Any, count: int, *, writable: bool = False) -> np.ndarray:
        if not isinstance(values, np.ndarray):
            raise ValueError(
                f"{type(self).__name__}.{what} must be a NumPy array of {count} {self._dtype}; "
                f"got {type(values).__name__}"
            )
        if values.ndim != 1 or values.shape[0] != count or values.dtype != self._dtype:
            raise ValueError(
                f"{type(self).__name__}.{what} must be a 1-D array of {count} {self._dtype}; "
                f"got shape {values.shape} of {values.dtype}"
            )
        if writable:
            if not (values.flags.c_contiguous and values.flags.writeable):
                raise ValueError(f"{type(self).__name__}.{what} must be a writable contiguous array")
            return values
        return np.ascontiguousarray(values)


# --------------------------------------------------------------------------- parameter store


class ParameterWindow(_Window):
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
        comm = _resolve_comm(comm)
        problem, n, dt = _check_vector_args("ParameterWindow", n, dtype)
        _agree(comm, "ParameterWindow", problem, (n, None if dt is None else dt.str))
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
        MPI = _mpi()
        with self._lock:
            win = self._win()
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
                    target = (0, hi - lo, self._mpitype)
                    win.Accumulate([buf[lo:hi], self._mpitype], r, target=target, op=MPI.REPLACE)
                win.Flush_all()
            self._comm.Barrier()

    def push(self, delta: np.ndarray) -> None:
        """Add ``delta`` (1-D, ``n`` elements, the window's dtype) to the stored vector.

        One-sided: only the calling rank takes part. ``MPI_Accumulate(SUM)`` into every
        shard, then ``Flush_all``: blocking until the add is complete at every target.
        Element-wise atomic; concurrent pushes from any ranks are never lost.
        """
        MPI = _mpi()
        with self._lock:
            win = self._win()
            buf = self._checked("push delta", delta, self._n)
            for r, lo, hi in self._targets:
                win.Accumulate([buf[lo:hi], self._mpitype], r, target=(0, hi - lo, self._mpitype), op=MPI.SUM)
            win.Flush_all()

    def pull(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read the stored vector into ``out`` (or a new array) and return it.

        One-sided: only the calling rank takes part; blocking until the data has arrived.
        ``MPI_Get_accumulate(NO_OP)`` from every shard: each element is a whole value (never
        torn by a concurrent push) that includes every push completed before the pull began.
        """
        MPI = _mpi()
        with self._lock:
            win = self._win()
            if out is None:
                out = np.empty(self._n, self._dtype)
            else:
                out = self._checked("pull out", out, self._n, writable=True)
            for r, lo, hi in self._targets:
                win.Get_accumulate(
                    [None, 0, self._mpitype], [out[lo:hi], self._mpitype], r,
                    target=(0, hi - lo, self._mpitype), op=MPI.NO_OP,
                )
            win.Flush_all()
            return out

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._nranks} shards"
        return f"ParameterWindow(n={self._n}, dtype={self._dtype}, {state})"


# --------------------------------------------------------------------------- peer windows


class PeerWindow(_Window):
    """Every rank holds a full vector of ``n`` floats that it alone publishes and anyone reads.

    Construction is collective (every rank of ``comm``, same ``n`` and ``dtype``) and
    blocking; every vector starts at zero. :meth:`publish` and :meth:`read` are one-sided:
    an agent publishes its parameters while peers read them, element-wise atomically (a
    read may mix two publications, element by element, but never tears an element).
    """

    def __init__(self, n: int, dtype: Any = np.float32, *, comm: Any = None) -> None:
        comm = _resolve_comm(comm)
        problem, n, dt = _check_vector_args("PeerWindow", n, dtype)
        _agree(comm, "PeerWindow", problem, (n, None if dt is None else dt.str))
        self._n = n
        super().__init__(comm, n, dt)

    @property
    def size(self) -> int:
        """Number of elements ``n`` of each rank's vector."""
        return self._n

    def publish(self, values: np.ndarray) -> None:
        """Overwrite this rank's vector with ``values``.

        One-sided and local to this rank's window (``Accumulate(REPLACE)`` on itself, then
        ``Flush``); blocking until the values are visible to every later :meth:`read`.
        """
        MPI = _mpi()
        with self._lock:
            win = self._win()
            buf = self._checked("publish values", values, self._n)
            target = (0, self._n, self._mpitype)
            win.Accumulate([buf, self._mpitype], self._rank, target=target, op=MPI.REPLACE)
            win.Flush(self._rank)

    def read(self, rank: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Read ``rank``'s published vector into ``out`` (or a new array) and return it.

        One-sided: ``rank`` does not take part. ``MPI_Get_accumulate(NO_OP)``, blocking
        until the data has arrived; every element is a whole published value.
        """
        MPI = _mpi()
        if not 0 <= rank < self._nranks:
            raise ValueError(f"PeerWindow.read rank must be in [0, {self._nranks}); got {rank}")
        with self._lock:
            win = self._win()
            if out is None:
                out = np.empty(self._n, self._dtype)
            else:
                out = self._checked("read out", out, self._n, writable=True)
            win.Get_accumulate(
                [None, 0, self._mpitype], [out, self._mpitype], rank,
                target=(0, self._n, self._mpitype), op=MPI.NO_OP,
            )
            win.Flush(rank)
            return out

    def __repr__(self) -> str:
        return f"PeerWindow(n={self._n}, dtype={self._dtype}{', closed' if self.closed else ''})"


# --------------------------------------------------------------------------- clocks


class ClockWindow(_Window):
    """One int64 step counter per rank, all held in rank 0's window memory (bounded staleness).

    Construction is collective and blocking; every clock starts at 0. Each rank advances only
    its own clock (:meth:`tick`, ``Fetch_and_op``), reads all of them (:meth:`clocks`),
    and waits for the slowest (:meth:`wait_until_within`). All one-sided: rank 0 takes no
    part beyond holding the memory. :meth:`retire` takes a finished agent out of the count,
    so it never holds the others back.
    """

    def __init__(self, *, comm: Any = None) -> None:
        comm = _resolve_comm(comm)
        self._clock = 0
        self._retired = False
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
        MPI = _mpi()
        with self._lock:
            win = self._win()
            if self._retired:
                raise UsageError(
                    "ClockWindow.tick() was called after retire(): a retired clock no longer counts"
                )
            one = np.ones(1, np.int64)
            before = np.zeros(1, np.int64)
            win.Fetch_and_op(
                [one, self._mpitype], [before, self._mpitype], CLOCK_HOME, self._rank, op=MPI.SUM
            )
            win.Flush(CLOCK_HOME)
            self._clock = int(before[0]) + 1
            return self._clock

    def clocks(self) -> np.ndarray:
        """Every rank's clock, indexed by rank (:data:`RETIRED` for retired ones).

        One-sided ``MPI_Get_accumulate(NO_OP)`` from rank 0, then ``Flush`` (which also drives
        passive-target progress); blocking. Each clock is a whole value, at least as recent
        as the last tick its owner completed before this read began.
        """
        MPI = _mpi()
        with self._lock:
            win = self._win()
            out = np.empty(self._nranks, np.int64)
            win.Get_accumulate(
                [None, 0, self._mpitype], [out, self._mpitype], CLOCK_HOME,
                target=(0, self._nranks, self._mpitype), op=MPI.NO_OP,
            )
            win.Flush(CLOCK_HOME)
            return out

    def retire(self) -> None:
        """Set this rank's clock to :data:`RETIRED`: waits on other ranks stop counting it.

        One-sided (``Accumulate(REPLACE)`` on rank 0's memory, then ``Flush``); blocking.
        Idempotent. Call it when an agent stops stepping, before any collective that the
        other ranks may only reach after more steps.
        """
        MPI = _mpi()
        with self._lock:
            win = self._win()
            if self._retired:
                return
            sentinel = np.full(1, RETIRED, np.int64)
            target = (self._rank, 1, self._mpitype)
            win.Accumulate([sentinel, self._mpitype], CLOCK_HOME, target=target, op=MPI.REPLACE)
            win.Flush(CLOCK_HOME)
            self._retired = True

    def wait_until_within(self, staleness: int, *, timeout: Optional[float] = None) -> None:
        """Block while this rank's clock is more than ``staleness`` ahead of the slowest active one.

        One-sided and local to the caller: polls :meth:`clocks` (each poll flushes, which
        drives passive-target progress), sleeping between polls from ``BACKOFF_FIRST_S``
        growing to ``BACKOFF_MAX_S``. Returns at once when a retired rank calls it, or when
        every other rank has retired. ``timeout`` (seconds): raise ``TimeoutError`` instead
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
            self._min_seen = int(active.min()) if active.size else RETIRED
            if self._clock - self._min_seen <= staleness:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"rank {self._rank} at clock {self._clock} waited {timeout} s for the slowest "
                    f"rank (clock {self._min_seen}) to come within {staleness} steps"
                )
            time.sleep(delay)
            delay = min(delay * BACKOFF_FACTOR, BACKOFF_MAX_S)

    def __repr__(self) -> str:
        flags = ", retired" * self._retired + ", closed" * self.closed
        return f"ClockWindow(clock={self._clock}{flags})"
