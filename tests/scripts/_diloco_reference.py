"""A NumPy reference of DiLoCo on a linear model trained by plain SGD on every rank, written
from the papers' rule (not with the library): each rank steps its own copy; fragment k's
pseudo-gradients θ_global − θ_local go out after steps (k+1)·H/P, (k+1)·H/P + H, ...; their mean
arrives ``overlap`` steps later, when θ_global's fragment takes PyTorch SGD's step with momentum
(Nesterov or not) and every rank's fragment is set to it; at the end an exchange in flight
arrives, then every fragment trained since it last went out goes out once more."""

import numpy as np

#: Features and rows per batch of the scripts' regression data.
D, B = 6, 8


def regression_batches(ranks, steps=40):
    """``batch(rank, step)`` -> (x, y): a noisy linear target, the same on every rank and in
    both frameworks' scripts (seed 0); y of shape (B, 1)."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=D)
    xs = rng.normal(size=(steps, ranks, B, D))
    ys = (xs @ w_true + 0.1 * rng.normal(size=(steps, ranks, B)))[..., None]
    return lambda rank, step: (xs[step, rank], ys[step, rank])


def linear_gradient(theta, x, y):
    """Gradient of mean((x·w + b − y)²) at theta = [w, b] (y of shape (B, 1))."""
    d = x.shape[1]
    r = x @ theta[:d] + theta[d] - y[:, 0]
    return np.concatenate([2.0 / len(r) * (x.T @ r), [2.0 / len(r) * r.sum()]])


def fragments(n, count):
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    edges = np.cumsum([0] + sizes)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(count)]


def simulate(batch, ranks, theta0, steps, H, P, overlap, lr, outer_lr, mu, nesterov):
    """``batch(rank, step)`` -> (x, y) of step ``step`` (from 0). Returns (θ_global, momentum, log)
    where log holds (fragment, sent after step, applied after step)."""
    local = [theta0.astype(np.float64).copy() for _ in range(ranks)]
    glob = theta0.astype(np.float64).copy()
    velocity = np.zeros_like(glob)
    parts = fragments(glob.size, P)
    every = H // P
    log, flight, last = [], None, {k: 0 for k in range(P)}

    def arrive(t):
        k, sent, deltas = flight
        lo, hi = parts[k]
        mean = sum(deltas) / ranks
        velocity[lo:hi] = mu * velocity[lo:hi] + mean
        glob[lo:hi] -= outer_lr * ((mean + mu * velocity[lo:hi]) if nesterov else velocity[lo:hi])
        for x in local:
            x[lo:hi] = glob[lo:hi]
        log.append((k, sent, t))

    def send(k, t):
        lo, hi = parts[k]
        last[k] = t
        return k, t, [glob[lo:hi] - x[lo:hi] for x in local]

    for t in range(1, steps + 1):
        for r in range(ranks):
            local[r] = local[r] - lr * linear_gradient(local[r], *batch(r, t - 1))
        if flight is not None and flight[1] + overlap == t:
            arrive(t)
            flight = None
        if t % every == 0:
            flight = send((t // every - 1) % P, t)
            if overlap == 0:
                arrive(t)
                flight = None
    if flight is not None:
        arrive(steps)
    for k in range(P):
        if last[k] < steps:
            flight = send(k, steps)
            arrive(steps)
    return glob, velocity, log
