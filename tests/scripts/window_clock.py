"""ClockWindow semantics, and the staleness bound with the last rank slowed down.

Phase 1 (semantics): rank 0 ticks ahead; its bounded wait times out while the others stand
still, returns once they catch up, and stops counting them once they retire.
Phase 2 (bounded): every rank ticks and waits within S each step, the last rank sleeps
SLOW_S per step; every rank records max - min of the active clocks after every step.
Phase 3 (control): the same without the wait, to show the recorded gap does grow.
"""

import time

import numpy as np
from _report import emit

from hvdagents.errors import UsageError
from hvdagents.strategies.windows import RETIRED, ClockWindow

SLOW_S = 0.01


def semantics(ctx, out):
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    with ClockWindow() as clock:
        if rank == 0:
            out["ticks"] = [clock.tick() for _ in range(3)]
        comm.Barrier()
        out["seen_after_ticks"] = clock.clocks().tolist()
        if rank == 0 and size > 1:
            try:
                clock.wait_until_within(1, timeout=0.2)
                out["blocked"] = False
            except TimeoutError:
                out["blocked"] = True
        comm.Barrier()
        if rank != 0:
            clock.tick()
            clock.tick()
        comm.Barrier()
        if rank == 0:
            t0 = time.monotonic()
            clock.wait_until_within(1, timeout=30)
            out["released_after_s"] = time.monotonic() - t0
        comm.Barrier()
        if rank != 0:
            clock.retire()
            clock.retire()  # idempotent
            try:
                clock.tick()
                out["tick_after_retire"] = "no error"
            except UsageError:
                out["tick_after_retire"] = "UsageError"
        comm.Barrier()
        if rank == 0:
            clock.wait_until_within(0, timeout=30)  # only itself left: returns at once
            values = clock.clocks()
            out["retired_seen"] = bool(np.all(values[1:] == RETIRED)) and int(values[0]) == 3


def largest_gap(ctx, staleness, steps, bounded):
    gaps = []
    with ClockWindow() as clock:
        ctx.comm.Barrier()
        for _ in range(steps):
            if ctx.rank == ctx.size - 1:
                time.sleep(SLOW_S)
            clock.tick()
            if bounded:
                clock.wait_until_within(staleness)
            values = clock.clocks()
            active = values[values != RETIRED]
            gaps.append(int(active.max() - active.min()))
        clock.retire()
        ctx.comm.Barrier()
    return max(gaps)


def run(ctx, staleness, steps):
    """Every rank emits its RESULT line (case ``clock``)."""
    out = {"case": "clock", "rank": ctx.rank, "staleness": staleness}
    semantics(ctx, out)
    out["bounded_gap"] = largest_gap(ctx, staleness, steps, True)
    out["free_gap"] = largest_gap(ctx, staleness, steps, False)
    emit(out)
