"""The contract of every asynchronous strategy, on a real (tiny) model.

Every rank starts from a different vector; after start() all hold rank 0's. Each trains
``steps`` steps towards its own target with a decaying step size, the runner exchanging through
the windows. Rank 0 reports how far apart the ranks were just before finish() (they must
have shared: without exchanges they would sit at targets 4 apart), whether after finish()
every rank holds bit-identical parameters, and their distance to the mean of the targets.

It also keeps an exact account of what every rank gave to the shared model, from what it
sees of its own model only (never the windows):

- Downpour pushes the change since its last pull divided by ``period`` (``normalize``), then
  takes the centre: the pushes of a rank add up to its own training progress (the sum of
  what its steps changed) divided by ``period``;
- EASGD moves ``alpha (x - c)`` from the model to the centre: what its exchanges took out of
  the model;
- Gossip moves models pairwise without creating or losing anything, and finish() ends at
  the mean: each rank adds its own training progress divided by the number of ranks.

The final model must equal rank 0's starting vector plus every rank's contribution, up to
rounding; a push, delivery or exchange of any rank that got lost (or counted twice) breaks it
by the size of that rank's contribution, reported as ``smallest_contribution``.
"""

import numpy as np
from _report import emit
from weak_model import VectorModel, consensus, strategy, target

from hvdagents.strategies.registry import make_runner

LR = 0.1


def contribution(name, moved, given, period, size):
    """What this rank's pushes must have added to the final model, by the strategy's rule."""
    if name.startswith("downpour"):
        return moved / period  # Downpour(normalize=True), as weak_model.strategy() builds it
    if name.startswith("easgd"):
        return given
    return moved / size  # gossip: the final model is the mean of the models


def run(ctx, name, steps):
    """One strategy on every rank; rank 0 emits its RESULT line (case ``contract:NAME``)."""
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    model = VectorModel(np.random.default_rng(rank).normal(size=target(0).size), target(rank), comm)
    first = comm.bcast(model.get_flat() if rank == 0 else None)
    config = strategy(name, size)
    runner = make_runner(config)
    runner.start(model)
    start_identical = all(np.array_equal(x, first) for x in comm.gather(model.get_flat()) or [first])
    moved = np.zeros(model.num_parameters)  # this rank's training progress: its steps' changes
    given = np.zeros(model.num_parameters)  # what its exchanges took out of its model
    for step in range(steps):
        before = model.get_flat()
        model.train_step(LR * (1.0 - step / steps))
        trained = model.get_flat()
        moved += trained - before
        runner.after_step(model)
        given += trained - model.x
    state = runner.state.to_dict()
    before = comm.gather(model.get_flat())
    runner.finish(model)
    runner.finish(model)  # idempotent
    finals = comm.gather(model.get_flat())
    mine = contribution(name, moved, given, config.period, size)
    contributions = comm.gather(mine)
    if rank != 0:
        return
    expected = first + np.sum(contributions, axis=0)
    emit({
        "case": f"contract:{name}",
        "start_identical": start_identical,
        "identical": all(np.array_equal(x, finals[0]) for x in finals),
        "error": float(np.max(np.abs(finals[0] - consensus(size)))),
        "spread": float(4.0 * (size - 1)),
        "disagreement": float(max(np.max(np.abs(x - np.mean(before, axis=0))) for x in before)),
        "accounting_error": float(np.max(np.abs(finals[0] - expected))),
        "scale": float(np.max(np.abs(expected))),
        "smallest_contribution": float(min(np.max(np.abs(c)) for c in contributions)),
        "state": state,
        "final_state": runner.state.to_dict(),
    })
