"""What the README promises every rank holds after ``close()``, computed in the test script
from what each rank recorded before it (NumPy float64), independently of the library.

Parameters, by strategy, from x0 (the common start), each rank's model just before
``close()`` and each rank's local progress (the sum over its optimizer steps of what the
step itself changed; exchanges and averages are not part of it):

- ``sync``: the ranks' models (identical already);
- ``localsgd``: their mean (a last average);
- ``downpour``: the centre, x0 plus every push; a push is the change since the last pull
  divided by ``period`` (``normalize``), and between a pull and the next push only local
  steps change the model, so the centre is x0 + sum(progress) / period;
- ``easgd``: the centre; an exchange moves alpha (x - c) from the model to the centre, so
  the centre plus the models only change by local steps: c = (1 + p) x0 + sum(progress)
  - sum(models);
- ``gossip``: the exact average; an exchange moves value between two models and creates
  none, so the mean is x0 + sum(progress) / p.

Everything else (buffers, non-trainable weights): floating values the float64 mean over
the ranks, counters rank 0's.
"""

import numpy as np


def expected_parameters(strategy, x0, models, progress, period):
    """The consensus parameters (float64) the README promises for ``strategy``."""
    models = [np.asarray(m, np.float64) for m in models]
    total = np.sum([np.asarray(d, np.float64) for d in progress], axis=0)
    x0 = np.asarray(x0, np.float64)
    p = len(models)
    if strategy == "sync":
        return models[0]
    if strategy == "localsgd":
        return np.mean(models, axis=0)
    if strategy == "downpour":
        return x0 + total / period
    if strategy == "easgd":
        return (1 + p) * x0 + total - np.sum(models, axis=0)
    if strategy == "gossip":
        return x0 + total / p
    raise ValueError(strategy)


def ulps(values, reference, eps):
    """Largest |values - reference| in units of the last place of the reference's dtype
    (``eps``: its machine epsilon), element-wise."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    scale = eps * np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(values - reference) / scale)) if reference.size else 0.0


def max_abs(a, b):
    """Largest element-wise |a - b| (float64)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
