"""The store under stress: every rank mixes pushes, pulls, clock ticks and waits on the
staleness bound, OPS of them, on windows from 1 to 10^6 elements; one RESULT line per rank.

Usage: ``store_stress.py OPS [KILL_RANK KILL_AT]``. With the default layout and ranks on two
hosts, each window's operations go through MPI windows to the ranks of the caller's host and
through the relay to the others, at once.

Operations (the same counts on every rank, in a random order drawn per rank):

- ``push`` (40 %): integer-valued float64 deltas, each element drawn from [0, 2**30), to one
  of the ``SIZES`` windows (half decades from 1 to 10^6 elements, odd sizes: uneven shards,
  ranks holding nothing). Each window is drawn uniformly among those this rank still has
  budget for (so sizes are log-uniform), and pushes + pulls of a window move at most
  ``ELEMENT_BUDGET`` elements per rank: one 10^6-element operation per rank, 10 of
  10^5, and so on (about 7.4 M elements, 60 MB, per rank in all; with the fixed seeds, 5 of
  the 8 ranks push 10^6 elements and 3 pull them).
- ``pull`` (30 %): the whole vector of a window drawn the same way (``ParameterWindow`` has
  no partial read; the windows' sizes give the spread).
- ``tick`` (15 %): ``ClockWindow.tick()``, which must return this rank's tick count.
- ``wait`` (15 %): ``wait_until_within(STALENESS)``, then ``clocks()``.

What is checked, on the rank that sees it (counts in the RESULT line, none allowed):

- exact sums: after a barrier every window equals the sum of every rank's pushes, computed
  independently (int64 totals, ``Allreduce``). Sums stay below 2**53, so float64 is exact.
- no torn read, per element as the README documents ("reads racing with writes see whole
  values"; elements are atomic one by one, not the vector): every element read is a whole
  value the element held, i.e. a sum of some of the pushes to it. Deltas are non-negative
  integers, so each element read must be an integer (``not_integer``), never below what this
  rank read of it before plus what it pushed since (``below_floor``: reads never go back,
  and a rank sees its own push once the push returned), and never above the final value
  (``above_final``). A read that mixed bytes of two values, missed a completed push, or saw a
  push twice fails one of these (mixed bytes of two integers of the same binade can be an
  integer in between, caught only when it goes back or above).
- clocks: ``tick()`` returns the count of this rank's ticks (``tick_wrong``); ``clocks()``
  never goes back and shows this rank's own count (``clocks_wrong``); after a wait no rank is
  more than STALENESS ticks behind this rank (``staleness_exceeded``); ``binding_waits``
  counts the waits where ``clocks()`` just before showed a rank more than STALENESS behind
  (so the bound was really exercised); at the end every clock equals the tick count.

``KILL_RANK KILL_AT``: that rank prints ``FAILING_AT <time.time()>`` and SIGKILLs itself
before its operation KILL_AT; the others go on.
"""

import os
import signal
import socket
import sys
import time
from contextlib import ExitStack

import numpy as np
from _report import emit

import hvdagents as hva
from hvdagents.strategies.windows import ClockWindow, ParameterWindow

SIZES = (1, 3, 10, 31, 100, 316, 1_000, 3_162, 10_000, 31_623, 100_003, 316_228, 1_000_000)
ELEMENT_BUDGET = 1_000_000  # per window and rank: pushed + pulled elements
VALUE_BITS = 30  # deltas in [0, 2**30)
STALENESS = 2
WAIT_TIMEOUT_S = 60.0  # a wait longer than this raises, which ends the job naming the rank
MIX = {"push": 0.40, "pull": 0.30, "tick": 0.15}  # the rest: wait


def idle_barrier(comm):
    """A barrier that sleeps while it waits: ranks that are done leave the 2 cores to those
    still working (and to the relay threads serving them)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(1e-3)


def main() -> int:
    ops = int(sys.argv[1])
    kill_rank, kill_at = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (-1, -1)
    ctx = hva.init()
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    assert size * ops * 2**VALUE_BITS < 2**53, "sums must stay exact in float64"
    rng = np.random.default_rng(1000 + rank)
    counts = {k: int(round(ops * f)) for k, f in MIX.items()}
    counts["wait"] = ops - sum(counts.values())
    kinds = np.repeat(list(counts), list(counts.values()))
    rng.shuffle(kinds)

    out = {"rank": rank, "host": socket.gethostname(), "ops": {k: 0 for k in counts}, "elements": 0, "largest_push": 0,
           "op_seconds": {k: 0.0 for k in counts},
           "not_integer": 0, "below_floor": 0, "above_final": 0, "sum_wrong": 0, "first_wrong": None,
           "tick_wrong": 0, "clocks_wrong": 0, "staleness_exceeded": 0, "binding_waits": 0}

    def wrong(what, **detail):
        out[what] += 1
        if out["first_wrong"] is None:
            out["first_wrong"] = {"what": what, **detail}

    with ExitStack() as stack:
        stores = [stack.enter_context(ParameterWindow(n, np.float64)) for n in SIZES]
        clock = stack.enter_context(ClockWindow())
        out["groups"] = stores[0]._layout.groups
        out["through_relay"] = stores[0]._layout.relay is not None
        floor = [np.zeros(n) for n in SIZES]  # what this rank must see at least, per element
        totals = [np.zeros(n, np.int64) for n in SIZES]  # what this rank pushed
        budget = [ELEMENT_BUDGET] * len(SIZES)
        ticks, last_clocks = 0, np.zeros(size, np.int64)

        def read_clocks():
            nonlocal last_clocks
            seen = clock.clocks()
            if (seen < last_clocks).any() or seen[rank] != ticks:
                wrong("clocks_wrong", seen=seen.tolist(), before=last_clocks.tolist(), ticks=ticks)
            last_clocks = np.maximum(seen, last_clocks)
            return seen

        comm.Barrier()
        started = time.monotonic()
        for i, kind in enumerate(kinds):
            if rank == kill_rank and i == kill_at:
                print(f"FAILING_AT {time.time():.3f}", flush=True)  # the job's end is timed from here
                os.kill(os.getpid(), signal.SIGKILL)
            out["ops"][kind] += 1
            t0 = time.monotonic()
            if kind in ("push", "pull"):
                w = int(rng.choice([j for j, n in enumerate(SIZES) if budget[j] >= n]))
                budget[w] -= SIZES[w]
                out["elements"] += SIZES[w]
                if kind == "push":
                    delta = rng.integers(0, 2**VALUE_BITS, SIZES[w])
                    stores[w].push(delta.astype(np.float64))
                    totals[w] += delta
                    out["largest_push"] = max(out["largest_push"], SIZES[w])
                    floor[w] += delta
                else:
                    got = stores[w].pull()
                    if (got != np.floor(got)).any():
                        e = int(np.flatnonzero(got != np.floor(got))[0])
                        wrong("not_integer", n=SIZES[w], element=e, value=float(got[e]))
                    if (got < floor[w]).any():
                        e = int(np.flatnonzero(got < floor[w])[0])
                        wrong("below_floor", n=SIZES[w], element=e, value=float(got[e]), floor=float(floor[w][e]))
                    np.maximum(floor[w], got, out=floor[w])
            elif kind == "tick":
                ticks += 1
                if clock.tick() != ticks:
                    wrong("tick_wrong", ticks=ticks)
            else:
                if ticks - read_clocks().min() > STALENESS:
                    out["binding_waits"] += 1
                clock.wait_until_within(STALENESS, timeout=WAIT_TIMEOUT_S)
                seen = read_clocks()
                if ticks - seen.min() > STALENESS:
                    wrong("staleness_exceeded", clocks=seen.tolist(), ticks=ticks)
            out["op_seconds"][kind] += time.monotonic() - t0
        out["seconds"] = round(time.monotonic() - started, 2)
        out["op_seconds"] = {k: round(v, 2) for k, v in out["op_seconds"].items()}

        idle_barrier(comm)  # every push is complete
        for w, n in enumerate(SIZES):
            expected = np.empty(n, np.int64)
            comm.Allreduce(totals[w], expected)
            final = stores[w].pull()
            if (final != expected).any():
                e = int(np.flatnonzero(final != expected)[0])
                wrong("sum_wrong", n=n, element=e, value=float(final[e]), expected=int(expected[e]))
            if (floor[w] > expected).any():
                e = int(np.flatnonzero(floor[w] > expected)[0])
                wrong("above_final", n=n, element=e, value=float(floor[w][e]), expected=int(expected[e]))
        every_ticks = comm.allgather(ticks)
        out["clocks_final"] = read_clocks().tolist() == every_ticks
        comm.Barrier()
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
