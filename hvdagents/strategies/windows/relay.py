"""How a window's operations reach their target: MPI one-sided inside a group, a relay between.

MPI's one-sided operations are truly one-sided only where the hardware or shared memory
makes them so. Inside a node every MPI we know uses shared memory (``osc/sm``); between
nodes over TCP, Open MPI 4.1 cannot create a window, Open MPI 5 creates one whose operations
wait for the target to enter MPI (a push to a rank computing for 3 s took 7 s), and MPICH
needs an asynchronous-progress thread per rank and crashed on large accumulates. So a
window's ranks are split into *groups* that share a one-sided path (:class:`Layout`): the
MPI window spans one group, and an operation on a rank of another group travels through the
:class:`Relay`: two-sided messages to a service thread in the target's process, which applies
it to its own memory with the same MPI operation and answers. The target's training thread
takes no part: the service thread polls with ``Improbe`` and sleeps between polls (about 2 %
of a core while idle), mpi4py releases the GIL while MPI works, and while a relay serves,
Python's thread switch interval is lowered to :data:`SWITCH_INTERVAL_S` so that a training
thread holding the GIL hands it over within a tenth of a millisecond.

``HVDAGENTS_WINDOWS`` chooses the groups, the same value on every rank:

- ``auto`` (default): one group per node (``MPI_COMM_TYPE_SHARED``): shared-memory windows
  inside a node, the relay between nodes. On one node nothing changes.
- ``mpi``: one group, the whole communicator: MPI's own one-sided operations everywhere (an
  RDMA network with an MPI that makes them one-sided). Probed; refused if not exact.
- ``relay``: every rank its own group: every operation between ranks through the relay
  (for an MPI whose windows fail even inside a node, and to test the relay on one host).

Semantics are the same on every path: element-wise atomic adds (the target applies
``Accumulate(SUM)``), whole-element reads (``Get_accumulate(NO_OP)``), and an operation is
complete at its target when the caller's flush returns (the service thread answers only
after its own ``Flush``).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...collectives import agree

__all__ = ["MODES", "window_mode", "Layout", "Relay", "layout_for", "SUM", "REPLACE", "GET", "FETCH_SUM"]

MODES = ("auto", "mpi", "relay")

#: Operation codes on the wire.
SUM, REPLACE, GET, FETCH_SUM = 0, 1, 2, 3

#: Header: window key, operation, target offset, element count, request id.
HEADER_LEN = 5
HEADER_TAG = 0

#: Service-thread polling: sleep after an idle poll, doubled per idle poll up to the longest.
POLL_FIRST_S = 20e-6
POLL_MAX_S = 1e-3

#: Python's thread switch interval while a relay serves (``sys.setswitchinterval``; the
#: default is 5 ms). A request takes the service thread about six GIL hand-overs (each MPI call
#: releases the GIL and takes it back); against a training thread that holds the GIL
#: (pure-Python work), a 4 MB push + pull across the simulated hosts took 70 ms with the
#: default, 30-40 ms with 0.5 ms (medians of 57 and 74 ms in 2 runs of 5), and 20-30 ms with
#: 0.1 ms, as against a trainer that releases the GIL (NumPy). The interval only matters while
#: another thread waits for the GIL, which the sleeping service thread does not.
SWITCH_INTERVAL_S = 0.1e-3


def window_mode(env: Optional[dict[str, str]] = None) -> str:
    """``HVDAGENTS_WINDOWS`` (default ``auto``), checked: a ``ValueError`` names bad values."""
    value = (os.environ if env is None else env).get("HVDAGENTS_WINDOWS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"HVDAGENTS_WINDOWS must be one of {', '.join(MODES)}; got {value!r}")
    return value


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


class Relay:
    """Carries window operations to ranks outside the caller's group, two-sided.

    Made collectively by :func:`layout_for`, one per communicator; it duplicates the
    communicator twice (requests, replies) and runs one daemon service thread per rank that
    serves the operations other groups send to this rank's memory. Window operations post
    requests (:meth:`post`) and wait for every answer (:meth:`wait`); the thread stops when
    the last window using the relay is freed (:meth:`release`, collective in window order).
    """

    def __init__(self, comm: Any, group_rank: int) -> None:
        self._requests = comm.Dup()
        self._replies = comm.Dup()
        self._me = group_rank
        self._ids = itertools.count()
        self._keys = itertools.count()
        tag_ub = comm.Get_attr(_mpi().TAG_UB) or 32767
        self._id_range = min(int(tag_ub), 1 << 24) - 1
        # the windows served, by key; the service thread runs while there is one
        self._windows: dict[int, tuple[Any, Any, np.dtype]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._switch_interval = sys.getswitchinterval()
        self._thread: Optional[threading.Thread] = None
        # the service thread's reused buffer: fresh pages cost a fault each on first touch
        # (16 MB of new memory took 43 ms to fill here, 3 times the transfer between hosts)
        self._scratch = np.empty(0, np.uint8)

    # ------------------------------------------------------------------ window registry

    def attach(self, win: Any, mpitype: Any, dtype: np.dtype) -> int:
        """Serve operations on ``win`` (this rank's memory in it); returns the window's key.
        Call it on every rank in the same order (window creation is collective), so a key
        names the same window everywhere."""
        with self._lock:
            key = next(self._keys)
            self._windows[key] = (win, mpitype, np.dtype(dtype))
            if self._thread is None:
                self._switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
                self._stopping.clear()
                self._thread = threading.Thread(target=self._serve, name="hvdagents-relay", daemon=True)
                self._thread.start()
        return key

    def release(self, key: int) -> None:
        """Stop serving window ``key``; the thread ends with the last window. Call it on every
        rank after a barrier over the communicator, so no operation on it is in flight."""
        with self._lock:
            if self._windows.pop(key, None) is None:
                return
            thread = None if self._windows else self._thread
            if thread is not None:
                self._thread = None
                self._stopping.set()
        if thread is not None:
            thread.join()
            if sys.getswitchinterval() == min(self._switch_interval, SWITCH_INTERVAL_S):
                sys.setswitchinterval(self._switch_interval)  # unless someone changed it since

    # ------------------------------------------------------------------ caller side

    def post(self, target: int, key: int, op: int, offset: int, mpitype: Any,
             values: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None) -> list[Any]:
        """Send one operation on window ``key`` to rank ``target`` of the communicator.

        ``values`` (SUM, REPLACE, FETCH_SUM) is sent; ``out`` (GET, FETCH_SUM) receives the
        answer. Both must stay untouched until :meth:`wait` on the returned requests; every
        operation is answered (an empty acknowledgement for SUM and REPLACE) once it is
        complete at the target."""
        count = (values if values is not None else out).shape[0]
        rid = next(self._ids) % self._id_range + 1
        header = np.array([key, op, offset, count, rid], np.int64)
        answer = [out, mpitype] if out is not None else [np.empty(0, np.uint8), _mpi().BYTE]
        pending = [self._replies.Irecv(answer, target, rid), self._requests.Isend(header, target, HEADER_TAG)]
        if values is not None:
            pending.append(self._requests.Isend([values, mpitype], target, rid))
        return pending  # mpi4py's requests keep their buffers alive

    @staticmethod
    def wait(pending: list[Any]) -> None:
        """Block until every posted operation is complete at its target."""
        if pending:
            _mpi().Request.Waitall(pending)

    # ------------------------------------------------------------------ service thread

    def _serve(self) -> None:
        MPI = _mpi()
        header = np.empty(HEADER_LEN, np.int64)
        status = MPI.Status()
        delay = POLL_FIRST_S
        try:
            while not self._stopping.is_set():
                message = self._requests.Improbe(MPI.ANY_SOURCE, HEADER_TAG, status)
                if message is None:
                    time.sleep(delay)
                    delay = min(delay * 2, POLL_MAX_S)
                    continue
                message.Recv(header)
                self._apply(status.Get_source(), *(int(x) for x in header))
                delay = POLL_FIRST_S
        except BaseException:  # noqa: BLE001 - a dead relay would hang every peer: end the job
            sys.stderr.write("hvdagents: the window relay's service thread failed:\n" + traceback.format_exc())
            sys.stderr.flush()
            self._requests.Abort(1)

    def _buffer(self, count: int, dtype: np.dtype) -> np.ndarray:
        """``count`` elements of the thread's scratch memory (grown, never shrunk)."""
        nbytes = count * dtype.itemsize
        if self._scratch.nbytes < nbytes:
            self._scratch = np.empty(nbytes, np.uint8)
        return self._scratch[:nbytes].view(dtype)

    def _apply(self, source: int, key: int, op: int, offset: int, count: int, rid: int) -> None:
        MPI = _mpi()
        with self._lock:
            win, mpitype, dtype = self._windows[key]
        target = (offset, count, mpitype)
        values = None
        if op != GET:
            values = self._buffer(count, dtype)
            self._requests.Recv([values, mpitype], source, rid)
        if op in (SUM, REPLACE):
            win.Accumulate([values, mpitype], self._me, target=target, op=MPI.SUM if op == SUM else MPI.REPLACE)
            win.Flush(self._me)
            self._replies.Send([np.empty(0, np.uint8), MPI.BYTE], source, rid)
            return
        result = self._buffer(count, dtype) if op == GET else np.empty(count, dtype)
        if op == GET:
            win.Get_accumulate([None, 0, mpitype], [result, mpitype], self._me, target=target, op=MPI.NO_OP)
        else:  # FETCH_SUM: one element, as the callers' own Fetch_and_op
            win.Fetch_and_op([values, mpitype], [result, mpitype], self._me, offset, op=MPI.SUM)
        win.Flush(self._me)
        self._replies.Send([result, mpitype], source, rid)


@dataclass(frozen=True)
class Layout:
    """Where the windows on one communicator keep their memory and how operations get there.

    ``group`` is the communicator the MPI window spans; ``group_rank[r]`` is rank ``r``'s rank
    in it when ``r`` shares this rank's group, else ``-1`` (reached through ``relay``).
    """

    mode: str
    groups: int
    group: Any
    group_rank: tuple[int, ...]
    relay: Optional[Relay]

    def local(self, rank: int) -> int:
        """``rank``'s rank in this rank's group, or ``-1`` if it is in another group."""
        return self.group_rank[rank]


_layouts: dict[int, Layout] = {}


def layout_for(comm: Any) -> Layout:
    """Collective (first call per communicator; cached): the groups of ``comm``'s ranks and,
    when there are several, the relay between them. Every rank must see the same
    ``HVDAGENTS_WINDOWS``; a bad or differing value raises ``ValueError`` on every rank."""
    key = comm.py2f()
    if key in _layouts:
        return _layouts[key]
    MPI = _mpi()
    try:
        mode, problem = window_mode(), None
    except ValueError as err:
        mode, problem = "", (ValueError, str(err))
    agree(comm, problem, mode, differ="HVDAGENTS_WINDOWS must be the same on every rank")
    rank = comm.Get_rank()
    if mode == "mpi":
        group = comm
    elif mode == "relay":
        group = comm.Split(rank, 0)
    else:
        group = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    # a group is named by its first member's rank in comm; group ranks follow comm's order
    seen_groups = comm.allgather((group.bcast(rank, root=0), group.Get_rank()))
    colour = [g for g, _ in seen_groups]
    group_rank = tuple(gr if colour[r] == colour[rank] else -1 for r, (_, gr) in enumerate(seen_groups))
    groups = len(set(colour))
    relay = Relay(comm, group.Get_rank()) if groups > 1 else None
    layout = Layout(mode, groups, group, group_rank, relay)
    _layouts[key] = layout
    return layout
