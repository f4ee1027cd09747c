"""Can this MPI do the windows' one-sided operations between these ranks, without loss?

On one node every MPI we know does with its defaults (shared memory). Across nodes it depends
on the library and the transport, and the failures are not all loud: Open MPI 4.1 over TCP
cannot create a window at all (``osc/sm`` is node-local, ``osc/rdma`` cannot use ``btl/tcp``,
``osc/pt2pt`` refuses ``MPI_THREAD_MULTIPLE``), and with ``--mca osc ucx`` over UCX's TCP
transport it creates windows that *lose* accumulates (even on one host). So before the first
window of a communicator, :func:`check_one_sided` (collective) decides, the same on every rank:

1. a known-bad combination (Open MPI < 5 with osc/ucx over UCX limited to TCP) is refused
   outright: across two hosts it passed the probe below, yet a longer run (300 pushes per
   rank) came out 2511 short, so no short probe can clear it;
2. otherwise a probe window is created and every rank hammers every other with
   ``Accumulate(SUM)`` and ``Fetch_and_op`` while they do the same; every total must be exact.

A failure raises :class:`~hvdagents.errors.OneSidedUnavailableError` on every rank, naming
what failed and the fixes. The verdict is cached per communicator; :func:`probe` returns it
without raising (``hvdagents doctor`` reports it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...collectives import first_problem
from ...errors import OneSidedUnavailableError

__all__ = ["OneSidedVerdict", "spans_nodes", "probe", "shared_problem", "check_one_sided",
           "PROBE_ROUNDS", "PROBE_ELEMENTS"]

#: Accumulates every rank sends to every rank in the probe, and their length. Kept short: over
#: TCP without asynchronous progress (Open MPI 5.0.11 across two simulated hosts) each
#: one-sided operation with its flush took ~20 ms, and 64 rounds on 4 ranks took 20 s.
PROBE_ROUNDS, PROBE_ELEMENTS = 16, 4096

FIXES = (
    "Fixes: leave HVDAGENTS_WINDOWS at auto (MPI windows only inside each node, the relay "
    "between nodes) or set it to relay (the relay between every pair of ranks); use an MPI whose "
    "one-sided operations work over your network (on InfiniBand, Open MPI with osc/ucx over "
    "UCX's RDMA transports); or use the synchronous strategies (Sync, LocalSGD), which need no "
    "one-sided operations. `python -m hvdagents doctor` under your launcher checks this combination."
)


@dataclass(frozen=True)
class OneSidedVerdict:
    """Whether the windows' operations work between the ranks of a communicator, and why."""

    ok: bool
    nodes: int
    detail: str


_verdicts: dict[int, OneSidedVerdict] = {}


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def spans_nodes(comm: Any) -> int:
    """Collective: the number of nodes (shared-memory domains) the ranks of ``comm`` are on."""
    MPI = _mpi()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        leader = 1 if local.Get_rank() == 0 else 0
    finally:
        local.Free()
    return int(comm.allreduce(leader))


def _library() -> str:
    return _mpi().Get_library_version().replace("\x00", "").strip()


def _known_bad(library: str, env: dict[str, str]) -> Optional[str]:
    """Local rule: a library/transport combination that is known to lose or fail."""
    match = re.search(r"Open MPI v(\d+)\.", library)
    if not match or int(match.group(1)) >= 5:
        return None
    osc = env.get("OMPI_MCA_osc", "")
    tls = {t.strip() for t in env.get("UCX_TLS", "").split(",") if t.strip()}
    if "ucx" in osc.split(",") and tls and tls <= {"tcp", "self", "sm", "shm", "posix", "sysv", "cma", "knem", "xpmem"}:
        return (f"Open MPI {match.group(0)[9:].rstrip('.')}.x with osc/ucx over UCX_TLS={env['UCX_TLS']} "
                "loses concurrent accumulates")
    return None


def _hammer(comm: Any) -> Optional[str]:
    """Collective probe with the windows' own operations: from every rank to every rank at
    once, ``Accumulate(SUM)`` of float64 vectors (the store's push) and int64
    ``Fetch_and_op(SUM)`` (the clocks), read back with ``Get_accumulate(NO_OP)`` (the pull);
    ``None`` when every total is exact, else what was wrong (on this rank)."""
    MPI = _mpi()
    rank, size = comm.Get_rank(), comm.Get_size()
    values = MPI.Win.Allocate(PROBE_ELEMENTS * 8, 8, comm=comm)
    try:
        counter = MPI.Win.Allocate(8, 8, comm=comm)
    except BaseException:
        values.Free()
        raise
    try:
        held = [(values, np.zeros(PROBE_ELEMENTS)), (counter, np.zeros(1, np.int64))]
        for win, mem in held:
            win.Lock_all(MPI.MODE_NOCHECK)
            win.Accumulate(mem, rank, op=MPI.REPLACE)
            win.Flush(rank)
        comm.Barrier()
        ones, one, old = np.ones(PROBE_ELEMENTS), np.ones(1, np.int64), np.empty(1, np.int64)
        for round_ in range(PROBE_ROUNDS):
            for k in range(size):
                target = (rank + k + round_) % size
                values.Accumulate(ones, target, target=(0, PROBE_ELEMENTS, MPI.DOUBLE), op=MPI.SUM)
                counter.Fetch_and_op(one, old, target, 0, op=MPI.SUM)
                values.Flush(target)
                counter.Flush(target)
        comm.Barrier()
        for win, mem in held:
            datatype = MPI.DOUBLE if mem.dtype == np.float64 else MPI.INT64_T
            win.Get_accumulate([None, 0, datatype], mem, rank, target=(0, mem.size, datatype), op=MPI.NO_OP)
            win.Flush(rank)
            win.Unlock_all()
        comm.Barrier()
        want = PROBE_ROUNDS * size
        for what, (_, mem) in zip(("float64 Accumulate", "int64 Fetch_and_op"), held):
            wrong = np.flatnonzero(mem != want)
            if wrong.size:
                return (f"a one-sided probe lost or corrupted updates: {what} from {size} ranks at once "
                        f"left {wrong.size} of {mem.size} elements wrong on rank {rank} (one holds "
                        f"{mem[wrong[0]]:.6g}, expected {want})")
        return None
    finally:
        values.Free()
        counter.Free()


def probe(comm: Any) -> OneSidedVerdict:
    """Collective: the verdict for ``comm`` (cached), the same object on every rank.

    The known-bad rules, then the probe (creating its window may fail; that is a verdict
    too). It runs on one node as well: a forced transport can break shared-memory windows
    too (osc/ucx over TCP returns garbage on one host)."""
    key = comm.py2f()
    if key in _verdicts:
        return _verdicts[key]
    nodes = spans_nodes(comm)
    library = _library().splitlines()[0].split(",")[0]
    where = "across nodes" if nodes > 1 else "on one node"
    problem = _known_bad(library, dict(os.environ))
    if problem is None:
        try:
            problem = _hammer(comm)
        except Exception as err:  # noqa: BLE001 - any MPI failure is the verdict
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            problem = f"MPI cannot create a one-sided window {where} ({text})"
    problem = first_problem(comm, problem)
    if problem:
        verdict = OneSidedVerdict(False, nodes, f"{library}: {problem}")
    else:
        verdict = OneSidedVerdict(True, nodes, f"{library}: {PROBE_ROUNDS * comm.Get_size()} concurrent "
                                               f"accumulates per rank {where}, none lost")
    _verdicts[key] = verdict
    return verdict


def shared_problem(comm: Any, *, whole: Any = None) -> Optional[str]:
    """Collective: what :func:`probe` found wrong between the ranks of ``comm``, or ``None``.

    ``whole``: a communicator that ``comm`` is one piece of (a node of it, say); the verdicts
    of all pieces are then shared over ``whole``, and every rank of it gets the first piece's
    problem (the same on every rank), or ``None`` when every piece is exact."""
    verdict = probe(comm)
    problem = None if verdict.ok else f"{verdict.detail} ({verdict.nodes} node(s))"
    if whole is not None:
        problem = first_problem(whole, problem)
    return problem


def check_one_sided(comm: Any, *, whole: Any = None) -> None:
    """Collective: raise :class:`OneSidedUnavailableError` on every rank (of ``whole`` too,
    when given) unless :func:`shared_problem` found nothing wrong."""
    problem = shared_problem(comm, whole=whole)
    if problem is not None:
        raise OneSidedUnavailableError(f"one-sided windows are not safe in this job: {problem}. {FIXES}")
