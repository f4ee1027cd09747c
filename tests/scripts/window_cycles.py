"""Windows are freed: CYCLES create/close cycles of every window kind neither leak nor hang.

Measures this process's resident memory and its number of memory mappings (each MPI window's
memory is one more mapping) after a warm-up and after all cycles. Then, as a calibration that
the same measures do see a leak, keeps LEFT_OPEN windows open; those, and one window dropped
without close(), are freed by the exit hook: the job must still end cleanly. A second exit
hook, registered before any window exists and therefore run after the library's, reports how
many windows were still registered. Args: CYCLES N.
"""

import atexit
import gc
import os
import sys
import warnings

import numpy as np
from _report import emit

import hvdagents as hva
from hvdagents.strategies.windows import _base as window
from hvdagents.strategies.window import ClockWindow, ParameterWindow, PeerWindow

WARMUP = 20
LEFT_OPEN = 20
cycles, n = int(sys.argv[1]), int(sys.argv[2])
ctx = hva.init()
comm, rank = ctx.comm, ctx.rank


@atexit.register
def report_left():  # runs after hvdagents' hook (atexit is last-in, first-out)
    emit({"rank": rank, "live_at_end": len(window._live)}, tag="EXIT")


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def mappings():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def cycle(i):
    store = ParameterWindow(n, np.float64)
    store.push(np.ones(n))
    store.close()
    with PeerWindow(n // ctx.size + 1, np.float32) as peers:
        peers.publish(np.ones(n // ctx.size + 1, np.float32))
    with ClockWindow() as clock:
        clock.tick()


for i in range(WARMUP):
    cycle(i)
gc.collect()
before = (rss_kib(), mappings())
for i in range(cycles - WARMUP):
    cycle(i)
gc.collect()
after = (rss_kib(), mappings())
live_after_cycles = len(window._live)

kept = [ParameterWindow(n, np.float64) for _ in range(LEFT_OPEN)]
for w in kept:
    w.push(np.ones(n))  # touch the memory
leaked = (rss_kib(), mappings())

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dropped = ParameterWindow(n, np.float64)
    del dropped
    gc.collect()
emit({
    "rank": rank,
    "rss_growth_kib": after[0] - before[0],
    "mapping_growth": after[1] - before[1],
    "live_after_cycles": live_after_cycles,
    "leak_rss_growth_kib": leaked[0] - after[0],
    "leak_mapping_growth": leaked[1] - after[1],
    "window_kib": n * 8 // ctx.size // 1024,
    "resource_warning": any(issubclass(w.category, ResourceWarning) for w in caught),
    "live_at_exit": len(window._live),
})
