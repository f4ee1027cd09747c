"""A real, tiny model for runner tests: a NumPy vector trained on a per-rank quadratic.

``VectorModel`` implements ``ParameterAccess`` over a NumPy vector; its training step is a
deterministic gradient step on ``|x - target|^2 / 2``, so every rank pulls towards its own
target and the consensus of all ranks is the mean of the targets.
"""

import numpy as np

from hvdagents.strategies import config

import time

N_PARAMETERS = 257  # odd, so shards differ in size
STEP_S = 0.001  # "compute" time of one training step, so that ranks really run side by side


def target(rank, n=N_PARAMETERS):
    return 4.0 * rank + np.sin(np.arange(n))


def consensus(size, n=N_PARAMETERS):
    return np.mean([target(r, n) for r in range(size)], axis=0)


class VectorModel:
    """ParameterAccess over a NumPy vector (no framework, no mock of MPI)."""

    def __init__(self, x, goal, comm):
        self.x = np.array(x, dtype=np.float64)
        self.goal = goal
        self.comm = comm

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def num_parameters(self):
        return self.x.size

    def get_flat(self):
        return self.x.copy()

    def set_flat(self, values):
        self.x[...] = values

    def average_parameters(self):
        self.comm.Allreduce(self.x.copy(), self.x)
        self.x /= self.comm.Get_size()

    def train_step(self, lr, seconds=STEP_S):
        time.sleep(seconds)
        self.x -= lr * (self.x - self.goal)


def ring(size):
    """Mixing matrix of a ring: self and both neighbours, equal weights."""
    w = np.zeros((size, size))
    for i in range(size):
        for j in {i, (i - 1) % size, (i + 1) % size}:
            w[i, j] = 1.0
    return (w / w.sum(axis=1, keepdims=True)).tolist()


def strategy(name, size):
    return {
        "downpour": lambda: config.Downpour(period=2),
        "downpour-ssp": lambda: config.Downpour(period=2, max_staleness=2, normalize=True),
        "easgd": lambda: config.EASGD(alpha=0.3, period=2),
        "easgd-ssp": lambda: config.EASGD(alpha=0.3, period=2, max_staleness=1),
        "gossip": lambda: config.Gossip(period=1, seed=7),
        "gossip-ring": lambda: config.Gossip(period=2, weights=ring(size)),
    }[name]()
