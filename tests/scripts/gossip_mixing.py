"""Gossip without gradient steps, 4 ranks under mpirun. RESULT lines on rank 0.

1. ``mean``: every rank starts from its own vector and exchanges with random peers at its own
   pace (random pauses); ``finish`` must end at the exact mean of the starting vectors.
2. ``rounds``: with a mixing matrix, ranks exchange one at a time (rank 0, then 1, ...: a
   deterministic order), and every rank's model is recorded after each round, for the test to
   compare with the protocol computed from the matrix alone.
"""

import sys
import time

import numpy as np
from _report import emit
from weak_model import VectorModel, ring

import hvdagents as hva
from hvdagents.strategies.config import Gossip
from hvdagents.strategies.registry import make_runner

ctx = hva.init()
comm, rank, size = ctx.comm, ctx.rank, ctx.size
D = 1000


def start_vector(r):
    return np.random.default_rng(100 + r).normal(size=D) * (r + 1) + r


def started(strategy):
    """A runner started from rank 0's vector, then every model set to its own start vector."""
    model = VectorModel(start_vector(0), np.zeros(D), comm)
    runner = make_runner(strategy)
    runner.start(model)
    model.set_flat(start_vector(rank))
    return model, runner


# 1. random pairwise gossip at each rank's own pace
model, runner = started(Gossip(period=1, seed=3))
rng = np.random.default_rng(rank)
for _ in range(40):
    time.sleep(rng.uniform(0, 0.002))
    runner.after_step(model)
spread_before = np.std(comm.allgather(model.get_flat()), axis=0).max()
runner.finish(model)
mean = np.mean([start_vector(r) for r in range(size)], axis=0)
if rank == 0:
    emit({"check": "mean", "max_rel_error": float(np.max(np.abs(model.get_flat() - mean)) / np.max(np.abs(mean))),
          "spread_start": float(np.std([start_vector(r) for r in range(size)], axis=0).max()),
          "spread_before_finish": float(spread_before)})

# 2. deterministic rounds with a matrix
matrices = {"ring": ring(size), "complete": (np.full((size, size), 1.0 / size)).tolist()}
for name in sys.argv[1:] or list(matrices):
    model, runner = started(Gossip(period=1, weights=matrices[name]))
    trajectory = [comm.allgather(model.get_flat().tolist())]
    for _ in range(12):
        for turn in range(size):
            if turn == rank:
                runner.after_step(model)
            comm.Barrier()
        trajectory.append(comm.allgather(model.get_flat().tolist()))
    runner.finish(model)
    if rank == 0:
        emit({"check": "rounds", "matrix": name, "weights": matrices[name],
              "starts": [start_vector(r)[:8].tolist() for r in range(size)],
              "trajectory": [[x[:8] for x in models] for models in trajectory],
              "final_error": float(np.max(np.abs(model.get_flat() - mean)))})
