"""One-sided operations between two ranks on different nodes, against two-sided MPI in the
same job: rank 0 works on rank 1's memory (an ``InboxWindow``: deliver = push, read = pull).

Measured, in this order:
1. a two-sided 4 MB ping-pong (``Send``/``Recv``), and two-sided bandwidth (``--mib`` messages);
2. push and pull bandwidth to/from the other rank's window memory (same message size);
3. *busy target*: rank 1 computes for ``--busy-s`` seconds without calling MPI (NumPy matrix
   products, which release the GIL, then a pure-Python loop, which holds it) while rank 0
   times push + pull of 4 MB to it; every push must have arrived, exactly;
4. the service thread's cost on rank 1: its CPU time while the rank sleeps, and a fixed NumPy
   workload's time with the thread serving nothing against before any window existed.

Rank 0 prints one result line. Run with 2 ranks, one per node (or on one node with
``HVDAGENTS_WINDOWS=relay`` to measure the relay on its own).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hvdagents as hva
from bench.workers._util import emit
from hvdagents.strategies.windows import InboxWindow

PING_BYTES = 4 << 20


def _matmul_work(seconds: float) -> int:
    a = np.random.default_rng(0).standard_normal((256, 256))
    rounds, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = np.tanh(a @ a)
        rounds += 1
    return rounds


def _python_work(seconds: float) -> int:
    total, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for i in range(1000):
            total += i * i
    return total


def _fixed_work(rounds: int) -> float:
    a = np.random.default_rng(1).standard_normal((256, 256))
    start = time.perf_counter()
    for _ in range(rounds):
        a = np.tanh(a @ a)
    return time.perf_counter() - start


def _idle_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning (Open MPI's spins): a waiting rank must not
    take the core its own service thread needs (this machine has 2 cores for both hosts)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(1e-3)


def _round_trip(comm, me: int, there: np.ndarray, back: np.ndarray) -> float:
    """Barrier, then rank 0 sends ``there`` and receives ``back`` (rank 1 the other way
    round); rank 0's seconds (two-sided ``Send``/``Recv``)."""
    comm.Barrier()
    start = time.perf_counter()
    if me == 0:
        comm.Send(there, 1)
        comm.Recv(back, 1)
    else:
        comm.Recv(there, 0)
        comm.Send(back, 0)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=16, help="message size of the bandwidth runs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--busy-s", type=float, default=4.0)
    p.add_argument("--work-rounds", type=int, default=400)
    args = p.parse_args()
    ctx = hva.init()
    comm = ctx.comm
    if comm.Get_size() != 2:
        raise SystemExit("cross_node_store runs on exactly 2 ranks")
    me = comm.Get_rank()
    out: dict = {"mib": args.mib, "reps": args.reps, "busy_s": args.busy_s}

    work_before = min(_fixed_work(args.work_rounds) for _ in range(3)) if me == 1 else 0.0

    ping = np.ones(PING_BYTES // 4, np.float32)
    times = [_round_trip(comm, me, ping, ping) for _ in range(args.reps + 1)]
    out["pingpong_4mb_s"] = statistics.median(times[1:])

    big = np.ones((args.mib << 20) // 4, np.float32)
    ack = np.zeros(1, np.int8)  # the receiver has it all
    rates = [big.nbytes / _round_trip(comm, me, big, ack) for _ in range(args.reps + 1)]
    out["two_sided_gbs"] = statistics.median(rates[1:]) / 1e9

    pushed = 0
    with InboxWindow(big.size, np.float32, comm=comm) as inbox:
        out["through_relay"] = inbox._layout.relay is not None
        push, pull = [], []
        for _ in range(args.reps + 1):
            _idle_barrier(comm)
            if me == 0:
                start = time.perf_counter()
                inbox.deliver(1, big)
                push.append(big.nbytes / (time.perf_counter() - start))
                pushed += 1
                start = time.perf_counter()
                inbox.read(1, big)
                pull.append(big.nbytes / (time.perf_counter() - start))
                big.fill(1.0)
            _idle_barrier(comm)
        out["push_gbs"] = statistics.median(push[1:]) / 1e9 if me == 0 else None
        out["pull_gbs"] = statistics.median(pull[1:]) / 1e9 if me == 0 else None
        comm.Barrier()

    with InboxWindow(PING_BYTES // 4, np.float32, comm=comm) as inbox:
        small = np.ones(PING_BYTES // 4, np.float32)
        busy: dict[str, list[float]] = {"numpy": [], "python": []}
        delivered = 0
        for kind, work in (("numpy", _matmul_work), ("python", _python_work)):
            comm.Barrier()
            if me == 1:
                work(args.busy_s)  # no MPI call on this thread until it is done
            else:
                time.sleep(0.25 * args.busy_s)
                for _ in range(3):
                    start = time.perf_counter()
                    inbox.deliver(1, small)
                    inbox.read(1, np.empty_like(small))
                    busy[kind].append(time.perf_counter() - start)
                    delivered += 1
                    time.sleep(0.1 * args.busy_s)
        comm.Barrier()
        delivered = comm.bcast(delivered, root=0)
        if me == 1:
            held = inbox.take()
            out["exact"] = bool(np.all(held == delivered))
            # the service thread's cost while it serves nothing
            cpu0, wall0 = time.process_time(), time.perf_counter()
            time.sleep(2.0)
            out["idle_thread_cpu"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            work_with = min(_fixed_work(args.work_rounds) for _ in range(3))
            out["work_slowdown"] = work_with / work_before
        out["busy_push_pull_s"] = busy if me == 0 else None
        comm.Barrier()

    found = comm.gather(out, root=0)
    if me == 0:
        result = {**found[0], **{k: found[1][k] for k in ("exact", "idle_thread_cpu", "work_slowdown")}}
        emit(result)


if __name__ == "__main__":
    main()
