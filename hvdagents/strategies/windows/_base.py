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

from ...errors import ClosedError, LauncherError
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

    __slots__ = ("win", "key")

    def __init__(self, win: Any, key: int) -> None:
        self.win = win
        self.key = key

    def free(self) -> None:
        """Collective over the window's group: end the epoch and free the window."""
        win, self.win = self.win, None
        with _registry_lock:
            _live.pop(self.key, None)
        if win is None or mpi().Is_finalized():
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


def resolve_comm(comm: Any) -> Any:
    if comm is None:
        from ...runtime import init

        ctx = init()
        if not ctx.mpi_world and ctx.size > 1:
            raise LauncherError(
                "RMA windows need an MPI world, and this job was started by 'horovodrun --gloo' "
                "(MPI sees a world of one). Launch with mpirun, srun --mpi=pmix, or horovodrun "
                "without --gloo."
            )
        return ctx.comm
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py intracommunicator; got {comm!r}")
    return comm


def agree(comm: Any, owner: str, problem: Optional[tuple[str, str]], signature: tuple) -> None:
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


def check_vector_args(owner: str, n: Any, dtype: Any) -> tuple[Optional[tuple[str, str]], int, Any]:
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


_W = TypeVar("_W", bound="Window")


class Window:
    """Shared lifecycle: collective allocation, one ``Lock_all`` epoch, close, context manager.

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
        unit = self._dtype.itemsize
        check_one_sided(comm)  # collective; across nodes: refused on every rank unless exact
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
        """``rank``'s whole vector into ``out`` (or a new array): ``Get_accumulate(NO_OP)``
        then ``Flush``, so every element is a whole value even while others write to it.
        ``what`` names the calling method in errors."""
        MPI = mpi()
        if not 0 <= rank < self._nranks:
            raise ValueError(f"{type(self).__name__}.read rank must be in [0, {self._nranks}); got {rank}")
        with self._lock:
            win = self._win()
            out = self._output(f"{what} out", out, self._n)
            win.Get_accumulate([None, 0, self._mpitype], [out, self._mpitype], rank,
                               target=(0, self._n, self._mpitype), op=MPI.NO_OP)
            win.Flush(rank)
            return out
