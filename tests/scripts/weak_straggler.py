"""A slow agent does not hold the others back under Downpour, unless a staleness bound says so.

The last rank sleeps SLOW_S per step. Free phase (Downpour, no bound): every rank trains for
the same wall-time budget FREE_S, and rank 0 reports every rank's step count: the fast ranks
against the slow one in the same window of time. Bounded phase (max_staleness=STALENESS):
the slow rank trains for BOUNDED_S, the others until they see its clock retired (so no rank
runs on after the slow one stopped); each rank records, after every step, the largest gap
between the active clocks it read, and the step counts are reported again. Both phases end
with finish() and a check that all ranks hold identical parameters.
"""

import time

import numpy as np
from _report import emit
from weak_model import VectorModel, target

from hvdagents.strategies.config import Downpour
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.windows import RETIRED

SLOW_S = 0.02
LR = 0.05
FREE_S = 2.0
BOUNDED_S = 1.0
STALENESS = 2


def phase(ctx, strategy, budget):
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    slow = rank == size - 1
    bounded = strategy.max_staleness is not None
    model = VectorModel(target(0), target(rank), comm)
    runner = make_runner(strategy)
    runner.start(model)
    gaps = []
    deadline = time.monotonic() + budget
    while True:
        model.train_step(LR, seconds=SLOW_S if slow else 0.0)
        runner.after_step(model)
        if bounded:  # read the StalenessBound's clocks
            values = runner.clock.clocks()
            active = values[values != RETIRED]
            gaps.append(int(active.max() - active.min()))
            if not slow and values[size - 1] == RETIRED:
                break
        if (slow or not bounded) and time.monotonic() >= deadline:
            break
    steps = runner.state.step
    runner.finish(model)
    finals = comm.gather(model.get_flat())
    identical = rank != 0 or all(np.array_equal(x, finals[0]) for x in finals)
    return comm.gather(steps), max(gaps, default=0), identical


def run(ctx):
    """Rank 0 emits the RESULT line (case ``straggler``)."""
    free_steps, _, free_identical = phase(ctx, Downpour(period=2), FREE_S)
    bounded_steps, gap, bounded_identical = phase(ctx, Downpour(period=2, max_staleness=STALENESS), BOUNDED_S)
    gaps = ctx.comm.gather(gap)
    if ctx.rank == 0:
        emit({"case": "straggler", "staleness": STALENESS, "free_steps": free_steps,
              "bounded_steps": bounded_steps, "max_gap": max(gaps),
              "identical": free_identical and bounded_identical})
