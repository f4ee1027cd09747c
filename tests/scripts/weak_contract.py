"""The contract of every asynchronous strategy, on a real (tiny) model.

Every rank starts from a different vector; after start() all hold rank 0's. Each trains
STEPS steps towards its own target with a decaying step size, the runner exchanging through
the windows. Rank 0 reports how far apart the ranks were just before finish() (they must
have shared: without exchanges they would sit at targets 4 apart), whether after finish()
every rank holds bit-identical parameters, and their distance to the mean of the targets.
Args: STRATEGY STEPS.
"""

import sys

import numpy as np
from _report import emit
from weak_model import VectorModel, consensus, strategy, target

import hvdagents as hva
from hvdagents.strategies.registry import make_runner

LR = 0.1
name, steps = sys.argv[1], int(sys.argv[2])
ctx = hva.init()
comm, rank, size = ctx.comm, ctx.rank, ctx.size

model = VectorModel(np.random.default_rng(rank).normal(size=target(0).size), target(rank), comm)
first = comm.bcast(model.get_flat() if rank == 0 else None)
runner = make_runner(strategy(name, size))
runner.start(model)
start_identical = all(np.array_equal(x, first) for x in comm.gather(model.get_flat()) or [first])
for step in range(steps):
    model.train_step(LR * (1.0 - step / steps))
    runner.after_step(model)
state = runner.state.to_dict()
before = comm.gather(model.get_flat())
runner.finish(model)
runner.finish(model)  # idempotent
finals = comm.gather(model.get_flat())
if rank == 0:
    emit({
        "start_identical": start_identical,
        "identical": all(np.array_equal(x, finals[0]) for x in finals),
        "error": float(np.max(np.abs(finals[0] - consensus(size)))),
        "spread": float(4.0 * (size - 1)),
        "disagreement": float(max(np.max(np.abs(x - np.mean(before, axis=0))) for x in before)),
        "state": state,
        "final_state": runner.state.to_dict(),
    })
