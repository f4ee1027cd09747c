"""All-reduce: our Horovod path (``horovod_binding("torch")``) against raw mpi4py ``Allreduce``.

Part 1, one tensor of each size: ``hvd.allreduce_`` on a torch tensor (what the agents call)
against ``comm.Allreduce(IN_PLACE, array)``.

Part 2, many small tensors (``--small-count`` tensors of ``--small-bytes``), one round each:

- ``hvd_grouped``: one ``grouped_allreduce_`` (as ``TorchAgent.average_parameters``);
- ``hvd_async``: ``allreduce_async_`` for every tensor, then wait for all (what
  ``DistributedOptimizer``'s hooks do; Horovod's background thread fuses what is pending);
- ``mpi_each``: one ``Allreduce`` per tensor;
- ``mpi_packed``: pack into one buffer, one ``Allreduce``, unpack (fusion by hand).

Horovod's background thread polls MPI even when idle, which slows every other MPI call in the
process on a machine with few cores. So the baseline runs with Horovod shut down: each
repetition has a Horovod phase (``hvd.init``, our variants, and mpi4py beside Horovod for
reference, then ``hvd.shutdown``) and an MPI phase, in alternating order.

Part 3, latency: ``--latency-ops`` all-reduces of ``--latency-bytes``, each timed on its own
(Horovod's ``allreduce_`` and mpi4py's ``Allreduce``); per repetition the median and the
share of operations that took over ``STALL_FACTOR`` times that median. Part 1's time per
operation is a mean and counts every such stall (a thread that lost its core for a scheduler
slice); the median is the operation's own latency.

Rank 0 prints seconds per operation (part 1) or per round (part 2) for every repetition.
Sums of zeros, so repeated in-place reductions stay finite.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

import hvdagents as hva
from bench.workers._util import emit, timed
from hvdagents.runtime import horovod_binding

FLOAT_BYTES = 4
#: An operation this many times slower than the median is counted as stalled (part 3).
STALL_FACTOR = 5
#: Most and fewest repeats of an operation inside one timing.
MAX_ITERS = 2000
MIN_ITERS = 2


def _iterations(comm: MPI.Comm, op: Callable[[], None], target_s: float) -> int:
    """Repeats so that one timing lasts about ``target_s``; the same on every rank."""
    op()  # warm-up (first use allocates, registers names, ...)
    once = timed(comm, op)
    iters = int(np.clip(target_s / max(once, 1e-9), MIN_ITERS, MAX_ITERS))
    return comm.bcast(iters, root=0)


class _Timer:
    """Seconds per call of named operations, one timing per call of :meth:`measure`."""

    def __init__(self, comm: MPI.Comm, target_s: float) -> None:
        self.comm = comm
        self.target_s = target_s
        self.iters: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}

    def measure(self, key: str, op: Callable[[], None]) -> None:
        if key not in self.iters:
            self.iters[key] = _iterations(self.comm, op, self.target_s)
        k = self.iters[key]

        def body() -> None:
            for _ in range(k):
                op()

        self.times.setdefault(key, []).append(timed(self.comm, body) / k)

    def latency(self, key: str, op: Callable[[], None], ops: int) -> None:
        """Time ``ops`` calls of ``op`` one by one (after a barrier); keep their median and the
        share stalled (over ``STALL_FACTOR`` times the median). This rank's clock."""
        op()
        self.comm.Barrier()
        seconds = np.empty(ops)
        for i in range(ops):
            start = time.perf_counter()
            op()
            seconds[i] = time.perf_counter() - start
        median = float(np.median(seconds))
        self.times.setdefault(f"latency/{key}", []).append(median)
        self.times.setdefault(f"stalled/{key}", []).append(float(np.mean(seconds > STALL_FACTOR * median)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], required=True,
                   help="message sizes in bytes")
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--target-s", type=float, required=True, help="seconds per timing")
    p.add_argument("--small-count", type=int, default=200)
    p.add_argument("--small-bytes", type=int, default=16384)
    p.add_argument("--latency-bytes", type=int, default=4096)
    p.add_argument("--latency-ops", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = hva.init()
    comm = ctx.comm
    hvd = horovod_binding("torch")
    timer = _Timer(comm, args.target_s)
    tensors = {size: torch.zeros(size // FLOAT_BYTES) for size in args.sizes}
    arrays = {size: np.zeros(size // FLOAT_BYTES, np.float32) for size in args.sizes}
    n_small = args.small_bytes // FLOAT_BYTES
    small_tensors = [torch.zeros(n_small) for _ in range(args.small_count)]
    small_arrays = [np.zeros(n_small, np.float32) for _ in range(args.small_count)]
    packed = np.zeros(n_small * args.small_count, np.float32)
    latency_tensor = torch.zeros(args.latency_bytes // FLOAT_BYTES)
    latency_array = np.zeros(args.latency_bytes // FLOAT_BYTES, np.float32)

    def hvd_async() -> None:
        handles = [hvd.allreduce_async_(t, op=hvd.Sum, name=f"bench.small.{i}") for i, t in enumerate(small_tensors)]
        for h in handles:
            hvd.synchronize(h)

    def mpi_each() -> None:
        for a in small_arrays:
            comm.Allreduce(MPI.IN_PLACE, a)

    def mpi_packed() -> None:
        np.concatenate(small_arrays, out=packed)
        comm.Allreduce(MPI.IN_PLACE, packed)
        for i, a in enumerate(small_arrays):
            a[:] = packed[i * n_small:(i + 1) * n_small]

    def horovod_phase() -> None:
        if not hvd.is_initialized():
            hvd.init(comm=comm)
        for size in args.sizes:
            timer.measure(f"hvd/{size}", lambda t=tensors[size], s=size: hvd.allreduce_(t, op=hvd.Sum, name=f"b.{s}"))
            timer.measure(f"mpi_beside_hvd/{size}", lambda a=arrays[size]: comm.Allreduce(MPI.IN_PLACE, a))
        timer.measure("small/hvd_grouped",
                      lambda: hvd.grouped_allreduce_(small_tensors, op=hvd.Sum, name="bench.small"))
        timer.measure("small/hvd_async", hvd_async)
        timer.latency("hvd", lambda: hvd.allreduce_(latency_tensor, op=hvd.Sum, name="bench.latency"),
                      args.latency_ops)
        hvd.shutdown()  # stop Horovod's background thread: the MPI phase runs without it

    def mpi_phase() -> None:
        for size in args.sizes:
            timer.measure(f"mpi/{size}", lambda a=arrays[size]: comm.Allreduce(MPI.IN_PLACE, a))
        timer.measure("small/mpi_each", mpi_each)
        timer.measure("small/mpi_packed", mpi_packed)
        timer.latency("mpi", lambda: comm.Allreduce(MPI.IN_PLACE, latency_array), args.latency_ops)

    hvd.shutdown()
    for rep in range(args.reps):
        for phase in ((horovod_phase, mpi_phase) if rep % 2 == 0 else (mpi_phase, horovod_phase)):
            comm.Barrier()
            phase()
    if ctx.is_root:
        single = {str(size): {v: timer.times[f"{v}/{size}"] for v in ("hvd", "mpi", "mpi_beside_hvd")}
                  for size in args.sizes}
        small = {k.split("/", 1)[1]: v for k, v in timer.times.items() if k.startswith("small/")}
        emit({"ranks": ctx.size, "horovod_env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
              "single_s": single,
              "small": {"count": args.small_count, "bytes": args.small_bytes, "round_s": small},
              "latency": {"bytes": args.latency_bytes, "ops": args.latency_ops, "stall_factor": STALL_FACTOR,
                          "median_s": {v: timer.times[f"latency/{v}"] for v in ("hvd", "mpi")},
                          "stalled_share": {v: timer.times[f"stalled/{v}"] for v in ("hvd", "mpi")}}})


if __name__ == "__main__":
    main()
