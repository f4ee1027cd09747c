"""Windows are freed: create/close cycles of every window kind neither leak nor hang.

Measures this process's resident memory and its number of memory mappings (each MPI window's
memory is one more mapping) after a warm-up and after all cycles. Then, as a calibration that
the same measures do see a leak, keeps LEFT_OPEN windows open; those, and one window dropped
without close(), are freed by the exit hook: the job must still end cleanly. A second exit
hook (:func:`report_at_exit`, registered before any window exists and therefore run after the
library's) reports how many windows were still registered. Run it last in its job.
"""

import atexit
import gc
import os
import warnings

import numpy as np
from _report import emit

from hvdagents.strategies.windows import ClockWindow, InboxWindow, ParameterWindow
from hvdagents.strategies.windows import _base as window

WARMUP = 20
LEFT_OPEN = 20


def report_at_exit(ctx):
    """Call before the job's first window: atexit runs hooks last-in, first-out."""
    assert not window._atexit_registered, "a window existed already"
    atexit.register(lambda: emit({"rank": ctx.rank, "live_at_end": len(window._live)}, tag="EXIT"))


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def mappings():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def run(ctx, cycles, n):
    """Every rank emits its RESULT line (case ``cycles``); leaves LEFT_OPEN + 1 windows open."""

    def cycle():
        store = ParameterWindow(n, np.float64)
        store.push(np.ones(n))
        store.close()
        with InboxWindow(n // ctx.size + 1, np.float32) as inboxes:
            inboxes.deliver(ctx.rank, np.ones(n // ctx.size + 1, np.float32))
        with ClockWindow() as clock:
            clock.tick()

    live_before = len(window._live)
    for _ in range(WARMUP):
        cycle()
    gc.collect()
    before = (rss_kib(), mappings())
    for _ in range(cycles - WARMUP):
        cycle()
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
        "case": "cycles",
        "rank": ctx.rank,
        "live_before": live_before,
        "rss_growth_kib": after[0] - before[0],
        "mapping_growth": after[1] - before[1],
        "live_after_cycles": live_after_cycles,
        "leak_rss_growth_kib": leaked[0] - after[0],
        "leak_mapping_growth": leaked[1] - after[1],
        "window_kib": n * 8 // ctx.size // 1024,
        "resource_warning": any(issubclass(w.category, ResourceWarning) for w in caught),
        "live_at_exit": len(window._live),
    })
    return kept  # still referenced: freed by the exit hook, not by the garbage collector
