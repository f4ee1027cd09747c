"""What every window kind shares: collective allocation, one passive-target epoch, closing
(also at exit, in creation order), argument agreement across ranks. See the package docstring
for the RMA rules every kind follows."""

from __future__ import annotations

import atexit
import itertools
import threading
import warnings
from typing import Any, Optional, TypeVar

import numpy as np

from ...collectives import Problem
from ...collectives import agree as agree_on
from ...errors import ClosedError
from .relay import FETCH_SUM, GET, SUM, Layout, Relay, layout_for
from .transport import check_one_sided

__all__ = ["SUPPORTED_DTYPES", "Window", "VectorPerRankWindow", "mpi", "resolve_comm", "agree", "check_vector_args"]

#: Element types a parameter, peer or inbox window can hold.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

def mpi() -> Any:
    from mpi4py import MPI

    return MPI


# --------------------------------------------------------------------------- lifecycle


class _Handle:
    """The MPI side of one window. Freed by ``close()`` or at interpreter exit, never by GC."""

    __slots__ = ("win", "key", "comm", "relay", "relay_key")

    def __init__(self, win: Any, key: int, comm: Any, relay: Optional[Relay], relay_key: int) -> None:
        self.win = win
        self.key = key
        self.comm = comm
        self.relay = relay
        self.relay_key = relay_key

    def free(self) -> None:
        """Collective over the window's communicator: end the epoch and free the window.

        With a relay, a barrier first: once every rank is past it, no operation on this
        window is in flight, and this rank's service thread may forget it."""
        win, self.win = self.win, None
        with _registry_lock:
            _live.pop(self.key, None)
        if win is None or mpi().Is_finalized():
            return
        if self.relay is not None:  # before the epoch ends: the service thread may still use it
            self.comm.Barrier()
            self.relay.release(self.relay_key)
        win.Unlock_all()
        win.Free()


_registry_lock = threading.Lock()
_live: dict[int, _Handle] = {}  # insertion order is creation order
_keys = itertools.count()
_atexit_registered = False


def _register(win: Any, comm: Any, relay: Optional[Relay], relay_key: int) -> _Handle:
    global _atexit_registered
    with _registry_lock:
        handle = _Handle(win, next(_keys), comm, relay, relay_key)
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


def resolve_comm(comm: Any) -> Any:
    if comm is None:
        from ...runtime import init, no_mpi_world

        ctx = init()
        if not ctx.mpi_world and ctx.size > 1:
            raise no_mpi_world("RMA windows are one-sided MPI between the ranks")
        return ctx.comm
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intracommunicator; got {comm!r}")
    return comm


def agree(comm: Any, owner: str, problem: Problem, signature: tuple) -> None:
    """Collective: every rank raises the same error if any rank's arguments are bad or differ.

    Arguments are checked after one ``allgather``, so a mistake on one rank cannot leave the
    others waiting in the window's collective constructor.
    """
    agree_on(comm, problem, signature, differ=f"{owner} must be created with the same arguments on every rank")


def check_vector_args(owner: str, n: Any, dtype: Any) -> tuple[Problem, int, Any]:
    """Local checks of (n, dtype); returns (problem or None, n, dtype)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        return (TypeError, f"{owner} n must be an int; got {type(n).__name__} {n!r}"), 0, None
    if n < 1:
        return (ValueError, f"{owner} n must be >= 1; got {n}"), 0, None
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in SUPPORTED_DTYPES:  # (`None in SUPPORTED_DTYPES` is True)
        return (ValueError, f"{owner} dtype must be float32 or float64; got {dtype!r}"), 0, None
    return None, int(n), dt


_W = TypeVar("_W", bound="Window")


class Window:
    """Shared lifecycle: collective allocation, one ``Lock_all`` epoch, close, context manager;
    and the four operations every kind is made of, routed by the communicator's
    :class:`~.relay.Layout`: MPI one-sided inside this rank's group, the relay to others.

    Calls on one window from several threads of a process are serialized by a lock.
    """

    def __init__(self, comm: Any, count: int, dtype: np.dtype) -> None:
        from mpi4py.util.dtlib import from_numpy_dtype

        MPI = mpi()
        self._comm = comm
        self._rank = comm.Get_rank()
        self._nranks = comm.Get_size()
        self._dtype = np.dtype(dtype)
        self._mpitype = from_numpy_dtype(self._dtype)
        self._lock = threading.RLock()
        self._handle: Optional[_Handle] = None
        self._pending: list[Any] = []
        unit = self._dtype.itemsize
        layout = layout_for(comm)  # collective, once per communicator
        self._layout: Layout = layout
        check_one_sided(layout.group, whole=comm)  # collective; refused on every rank unless exact
        win = MPI.Win.Allocate(count * unit, unit, comm=layout.group)
        win.Lock_all(MPI.MODE_NOCHECK)
        relay_key = -1
        if layout.relay is not None:
            relay_key = layout.relay.attach(win, self._mpitype, self._dtype)
        self._handle = _register(win, comm, layout.relay, relay_key)
        if count:
            # MPI_Win_allocate leaves memory undefined: start every element at zero
            me = layout.local(self._rank)
            win.Accumulate([np.zeros(count, self._dtype), self._mpitype], me, op=MPI.REPLACE)
            win.Flush(me)
        comm.Barrier()

    # ------------------------------------------------------------------ routed operations
    # Each issues one operation on ``target``'s memory (a rank of ``comm``) at element
    # ``offset``; :meth:`_complete` then waits until every issued one is complete there.

    def _accumulate(self, target: int, offset: int, values: np.ndarray, op: int) -> None:
        """Element-wise atomic ``SUM`` or ``REPLACE`` of ``values`` into ``target``'s memory."""
        local = self._layout.local(target)
        if local >= 0:
            MPI = mpi()
            self._win().Accumulate([values, self._mpitype], local, target=(offset, values.shape[0], self._mpitype),
                                   op=MPI.SUM if op == SUM else MPI.REPLACE)
        else:
            self._pending += self._relay().post(target, self._handle.relay_key, op, offset, self._mpitype,
                                                values=values)

    def _read(self, target: int, offset: int, out: np.ndarray) -> None:
        """Whole-element read (``Get_accumulate(NO_OP)``) of ``target``'s memory into ``out``."""
        local = self._layout.local(target)
        if local >= 0:
            MPI = mpi()
            self._win().Get_accumulate([None, 0, self._mpitype], [out, self._mpitype], local,
                                       target=(offset, out.shape[0], self._mpitype), op=MPI.NO_OP)
        else:
            self._pending += self._relay().post(target, self._handle.relay_key, GET, offset, self._mpitype, out=out)

    def _fetch_add(self, target: int, offset: int, value: np.ndarray, before: np.ndarray) -> None:
        """Atomic ``Fetch_and_op(SUM)`` of one element: its old value into ``before``."""
        local = self._layout.local(target)
        if local >= 0:
            MPI = mpi()
            self._win().Fetch_and_op([value, self._mpitype], [before, self._mpitype], local, offset, op=MPI.SUM)
        else:
            self._pending += self._relay().post(target, self._handle.relay_key, FETCH_SUM, offset, self._mpitype,
                                                values=value, out=before)

    def _complete(self, target: Optional[int] = None) -> None:
        """Block until every operation issued (on ``target``, or on any rank) is complete
        at its target: ``Flush`` for MPI's, every answer for the relay's."""
        win = self._win()
        local = -1 if target is None else self._layout.local(target)
        if local >= 0:
            win.Flush(local)
        elif target is None:
            win.Flush_all()
        pending, self._pending = self._pending, []
        Relay.wait(pending)

    def _relay(self) -> Relay:
        self._win()
        assert self._layout.relay is not None  # local() is -1 only where there is a relay
        return self._layout.relay

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

    def _output(self, what: str, out: Optional[np.ndarray], count: int) -> np.ndarray:
        """``out`` checked as a writable destination of ``count`` elements, or a new array."""
        if out is None:
            return np.empty(count, self._dtype)
        return self._checked(what, out, count, writable=True)


class VectorPerRankWindow(Window):
    """A window in which every rank holds a full vector of ``n`` floats (peer and inbox
    windows). Collective construction: same ``n`` and ``dtype`` on every rank, checked."""

    def __init__(self, n: int, dtype: Any = np.float32, *, comm: Any = None) -> None:
        comm = resolve_comm(comm)
        owner = type(self).__name__
        problem, n, dt = check_vector_args(owner, n, dtype)
        agree(comm, owner, problem, (n, None if dt is None else dt.str))
        self._n = n
        super().__init__(comm, n, dt)

    @property
    def size(self) -> int:
        """Number of elements ``n`` of each rank's vector."""
        return self._n

    def _read_vector(self, rank: int, out: Optional[np.ndarray], what: str = "read") -> np.ndarray:
        """``rank``'s whole vector into ``out`` (or a new array): a whole-element read, then
        its completion, so every element is a whole value even while others write to it.
        ``what`` names the calling method in errors."""
        if not 0 <= rank < self._nranks:
            raise ValueError(f"{type(self).__name__}.read rank must be in [0, {self._nranks}); got {rank}")
        with self._lock:
            self._win()
            out = self._output(f"{what} out", out, self._n)
            self._read(rank, 0, out)
            self._complete(rank)
            return out
