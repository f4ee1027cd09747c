"""A slow agent does not hold the others back under Downpour, unless a staleness bound says so.

The last rank sleeps SLOW_S per step. Every rank trains for the same wall-time budget.
Free phase (Downpour, no bound): rank 0 reports every rank's step count. Bounded phase
(max_staleness=S): each rank also records, after every step, the largest gap between active
clocks it read, and the step counts are reported again. Both phases end with finish() and
a check that all ranks hold identical parameters. Args: FREE_S BOUNDED_S S.
"""

import sys
import time

import numpy as np
from _report import emit
from weak_model import VectorModel, target

import hvdagents as hva
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.config import Downpour
from hvdagents.strategies.window import RETIRED

SLOW_S = 0.02
LR = 0.05
free_s, bounded_s, staleness = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ctx = hva.init()
comm, rank, size = ctx.comm, ctx.rank, ctx.size
slow = rank == size - 1


def phase(strategy, budget):
    model = VectorModel(target(0), target(rank), comm)
    runner = make_runner(strategy)
    runner.start(model)
    gaps = []
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        model.train_step(LR, seconds=SLOW_S if slow else 0.0)
        runner.after_step(model)
        if getattr(runner, "clock", None) is not None:  # a StalenessBound: read its clocks
            values = runner.clock.clocks()
            active = values[values != RETIRED]
            gaps.append(int(active.max() - active.min()))
    steps = runner.state.step
    runner.finish(model)
    finals = comm.gather(model.get_flat())
    identical = rank != 0 or all(np.array_equal(x, finals[0]) for x in finals)
    return comm.gather(steps), max(gaps, default=0), identical


free_steps, _, free_identical = phase(Downpour(period=2), free_s)
bounded_steps, gap, bounded_identical = phase(Downpour(period=2, max_staleness=staleness), bounded_s)
gaps = comm.gather(gap)
if rank == 0:
    emit({"free_steps": free_steps, "bounded_steps": bounded_steps, "max_gap": max(gaps),
          "identical": free_identical and bounded_identical})
