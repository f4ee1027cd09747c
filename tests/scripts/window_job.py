"""Every multi-rank check of the RMA windows in one job, case by case, in the order given.

Parts: ``sum:N:DTYPE`` (window_sum.py), ``consistency`` (window_consistency.py), ``clock``
(window_clock.py), ``modes`` (window_modes.py, both cases), ``cycles`` (window_cycles.py; it
leaves windows for the exit hook, so it must come last). Every case prints RESULT lines named
by its ``case``. Args: PART...
"""

import sys

import numpy as np
import window_clock
import window_consistency
import window_cycles
import window_modes
import window_sum

import hvdagents as hva

PUSHES = 1000  # per rank, into the sum
CONSISTENCY = (20000, 300)  # elements, pushes
CLOCK = (2, 40)  # staleness, steps
CYCLES = (200, 1 << 17)  # create/close cycles, elements

parts = sys.argv[1:]
if "cycles" in parts[:-1]:
    raise SystemExit("cycles must be the last part: it leaves windows open for the exit hook")
ctx = hva.init()
if "cycles" in parts:
    window_cycles.report_at_exit(ctx)
kept = []
for part in parts:
    name, _, rest = part.partition(":")
    if name == "sum":
        n, dtype = rest.split(":")
        window_sum.run(ctx, int(n), np.dtype(dtype), PUSHES)
    elif name == "consistency":
        window_consistency.run(ctx, *CONSISTENCY)
    elif name == "clock":
        window_clock.run(ctx, *CLOCK)
    elif name == "modes":
        window_modes.run(ctx, "differ")
        window_modes.run(ctx, "bad")
    elif name == "cycles":
        kept = window_cycles.run(ctx, *CYCLES)
    else:
        raise SystemExit(f"unknown part {part!r}")
