"""Horovod's cycle time: latency, training steps/s and the idle background thread's CPU.

For each repetition and each cycle time (rotating order), Horovod is started with
``HOROVOD_CYCLE_TIME`` set (``hvd.init`` reads it), and measures:
- ``latency_s``: one 4 KiB ``allreduce_`` (median of a timed loop);
- ``steps_per_s``: the 85K-parameter MLP (64-256-256-10, batch 32) with Horovod's
  ``DistributedOptimizer`` (only meaningful with 2+ ranks; with one rank Horovod skips it);
- ``idle_cpu``: CPU seconds per second this process uses while it sleeps with Horovod running
  (the background thread alone);
then ``hvd.shutdown()``. Rank 0 prints every repetition.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

import horovod.torch as hvd
import torch
from mpi4py import MPI

import hvdagents as hva
from bench.workers._util import emit, timed, torch_mlp

DIMS = [64, 256, 256, 10]  # the 85K-parameter MLP of the overhead benchmark


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cycle-times", required=True, help="comma-separated milliseconds")
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--ops", type=int, required=True, help="all-reduces and steps per timing")
    p.add_argument("--idle-s", type=float, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = hva.init()
    comm: MPI.Comm = ctx.comm
    cycles = args.cycle_times.split(",")
    x, y = torch.randn(32, DIMS[0]), torch.randint(0, DIMS[-1], (32,))
    loss_fn = torch.nn.CrossEntropyLoss()
    small = torch.zeros(1024)
    found: dict[str, dict[str, list[float]]] = {c: {"latency_s": [], "steps_per_s": [], "idle_cpu": []}
                                                for c in cycles}
    for rep in range(args.reps):
        for cycle in cycles[rep % len(cycles):] + cycles[:rep % len(cycles)]:
            os.environ["HOROVOD_CYCLE_TIME"] = cycle
            hvd.init(comm=comm)
            for _ in range(10):
                hvd.allreduce_(small, op=hvd.Sum, name="small")

            def reduce_loop() -> None:
                for _ in range(args.ops):
                    hvd.allreduce_(small, op=hvd.Sum, name="small")

            found[cycle]["latency_s"].append(timed(comm, reduce_loop) / args.ops)
            model = torch_mlp(DIMS)
            opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                           named_parameters=model.named_parameters())

            def train_loop(n: int = args.ops, opt: Any = opt, model: torch.nn.Module = model) -> None:
                for _ in range(n):
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    opt.step()

            train_loop(10)
            found[cycle]["steps_per_s"].append(args.ops / timed(comm, train_loop))
            comm.Barrier()
            start_cpu, start = _cpu_seconds(), time.perf_counter()
            time.sleep(args.idle_s)
            found[cycle]["idle_cpu"].append((_cpu_seconds() - start_cpu) / (time.perf_counter() - start))
            hvd.shutdown()
    idle = comm.gather(found, root=0)
    if ctx.is_root:
        for c in cycles:  # the busiest rank's idle CPU
            found[c]["idle_cpu"] = [max(r[c]["idle_cpu"][i] for r in idle) for i in range(args.reps)]
        emit({"ranks": ctx.size, "cores": os.cpu_count(), "cycle_times_ms": cycles, "results": found})


if __name__ == "__main__":
    main()
