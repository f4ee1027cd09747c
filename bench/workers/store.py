"""Parameter-store throughput: ``ParameterWindow`` push/pull, memcpy, and a two-sided server.

Phases, each run by every rank for ``--duration`` seconds as fast as it can, in rotating
order within each repetition:

- ``memcpy``: ``np.copyto`` of the vector on every rank at once (the machine's copy bandwidth);
- ``push`` / ``pull`` / ``push_pull``: ``ParameterWindow.push`` and ``.pull`` of the whole
  vector from every rank (one-sided; the store is sharded over all ranks);
- ``push_pull_beside_hvd``: ``push_pull`` with Horovod's torch binding initialised, as inside a
  TorchAgent (Horovod's background thread polls MPI even when idle);
- ``server``: a two-sided parameter server written the way mpi_learn/NNLO did it: rank 0
  loops on ``Recv(source=ANY_SOURCE)``, adds the update to its vector and ``Send``s the
  vector back; the other ranks are workers sending an update and receiving the parameters.

Rank 0 prints, per phase and repetition, the operations per second summed over the ranks
that did them.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
from mpi4py import MPI

import hvdagents as hva
from bench.workers._util import emit

#: Message tags of the two-sided server.
TAG_UPDATE, TAG_PARAMS, TAG_STOP = 1, 2, 3
SERVER = 0
#: Length of the untimed warm-up run of every phase, in seconds.
WARMUP_S = 0.2
#: Size of each pushed element: small enough that the vector stays finite.
DELTA = 1e-7


def _loop(op: Callable[[], None], duration: float) -> tuple[int, float]:
    """Run ``op`` until ``duration`` has passed; (count, seconds taken)."""
    start = time.perf_counter()
    deadline = start + duration
    count = 0
    while True:
        op()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count, now - start


def _server(comm: MPI.Comm, n: int, duration: float) -> tuple[int, float]:
    """One phase of the two-sided parameter server; every rank returns its (count, seconds)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        return 0, duration
    buf = np.zeros(n, np.float32)
    if rank == SERVER:
        centre = np.zeros(n, np.float32)
        status = MPI.Status()
        start = time.perf_counter()
        stopped = 0
        while stopped < size - 1:
            comm.Recv(buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if status.Get_tag() == TAG_STOP:
                stopped += 1
                continue
            centre += buf
            comm.Send(centre, dest=status.Get_source(), tag=TAG_PARAMS)
        return 0, time.perf_counter() - start  # the server applies updates; workers count them
    delta = np.full(n, DELTA, np.float32)

    def update() -> None:
        comm.Send(delta, dest=SERVER, tag=TAG_UPDATE)
        comm.Recv(buf, source=SERVER, tag=TAG_PARAMS)

    result = _loop(update, duration)
    comm.Send(np.zeros(0, np.float32), dest=SERVER, tag=TAG_STOP)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True, help="float32 elements in the vector")
    p.add_argument("--duration", type=float, required=True, help="seconds per phase and repetition")
    p.add_argument("--reps", type=int, required=True)
    args = p.parse_args()
    ctx = hva.init()
    comm, n = ctx.comm, args.n
    store = hva.ParameterWindow(n, np.float32)
    store.init(np.zeros(n, np.float32) if ctx.is_root else None)
    delta = np.full(n, DELTA, np.float32)
    out = np.empty(n, np.float32)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)

    def push_pull() -> None:
        store.push(delta)
        store.pull(out)

    def beside_horovod(duration: float) -> tuple[int, float]:
        import horovod.torch as hvd

        hvd.init(comm=comm)
        comm.Barrier()
        try:
            return _loop(push_pull, duration)
        finally:
            comm.Barrier()
            hvd.shutdown()

    phases: dict[str, Callable[[float], tuple[int, float]]] = {
        "memcpy": lambda d: _loop(lambda: np.copyto(dst, src), d),
        "push": lambda d: _loop(lambda: store.push(delta), d),
        "pull": lambda d: _loop(lambda: store.pull(out), d),
        "push_pull": lambda d: _loop(push_pull, d),
        "push_pull_beside_hvd": beside_horovod,
        "server": lambda d: _server(comm, n, d),
    }
    names = list(phases)
    for name in names:  # untimed: first touch of every buffer, MPI's connection set-up
        comm.Barrier()
        phases[name](min(args.duration, WARMUP_S))
    ops_per_s: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            comm.Barrier()
            count, seconds = phases[name](args.duration)
            comm.Barrier()
            ops_per_s[name].append(comm.allreduce(count / seconds, op=MPI.SUM))
    store.close()
    if ctx.is_root:
        emit({"ranks": ctx.size, "n": n, "itemsize": 4, "duration_s": args.duration,
              "server_workers": ctx.size - 1, "ops_per_s": ops_per_s})


if __name__ == "__main__":
    main()
