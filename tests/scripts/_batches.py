"""Data for scripts that compare N ranks with one process on the full batches."""

import numpy as np


def regression_batches(steps: int, batch: int, rank: int, size: int, features: int = 5):
    """Generated ``(X, Y)`` of ``steps`` full batches, and the row indices of this rank's part
    of every full batch, in order (rank r takes the r-th of ``size`` equal parts): fit on
    ``X[mine]`` with ``batch_size=batch // size`` and ``shuffle=False`` sees, step by step,
    this rank's part of the full batch one process sees."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * batch, features)).astype("float32")
    y = rng.normal(size=(steps * batch, 1)).astype("float32")
    part = batch // size
    mine = np.concatenate([np.arange(s * batch, (s + 1) * batch)[rank * part:(rank + 1) * part] for s in range(steps)])
    return x, y, mine
