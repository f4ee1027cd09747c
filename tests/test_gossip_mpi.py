"""Gossip is average-preserving, and mixes at the speed its matrix predicts (4 ranks).

The reference protocol below is written from the documentation of
``hvdagents.strategies.exchanges.GossipExchange`` alone, in NumPy: the MPI run must follow it
to rounding, and its speed is read off the eigenvalues of one round's linear map."""

import numpy as np
import pytest

from mpirun import run_job

RANKS = 4


@pytest.fixture(scope="module")
def results():
    job = run_job("gossip_mixing.py", np=RANKS, timeout=180).check()
    return job.results()


def one_round(x, inbox, pub, w):
    """Every agent exchanges once, rank 0 first: take the inbox, move by w_ij/2 (y_j - x_i)
    towards each effective y_j (j's publication plus its inbox), deliver the opposite to j's
    inbox, publish."""
    x, inbox, pub = x.copy(), inbox.copy(), pub.copy()
    for i in range(len(x)):
        x[i] += inbox[i]
        inbox[i] = 0
        moved = np.zeros_like(x[i])
        for j in np.flatnonzero(w[i] > 0):
            if j == i:
                continue
            d = (pub[j] + inbox[j] - x[i]) * (0.5 * w[i, j])
            moved += d
            inbox[j] -= d
        x[i] += moved
        pub[i] = x[i]
    return x, inbox, pub


def round_map_rate(w):
    """Second-largest |eigenvalue| of one round's linear map on (models, inboxes, published)."""
    n = len(w)
    columns = []
    for k in range(3 * n):
        z = np.zeros(3 * n)
        z[k] = 1.0
        x, inbox, pub = one_round(z[:n, None], z[n:2 * n, None], z[2 * n:, None], w)
        columns.append(np.concatenate([x[:, 0], inbox[:, 0], pub[:, 0]]))
    moduli = sorted(np.abs(np.linalg.eigvals(np.array(columns).T)))
    assert moduli[-1] == pytest.approx(1.0)  # the preserved mean
    return moduli[-2]


def test_any_order_of_exchanges_preserves_the_mean(results):
    (mean,) = [r for r in results if r["check"] == "mean"]
    assert mean["spread_before_finish"] < 0.5 * mean["spread_start"]  # they did mix
    assert mean["max_rel_error"] < 1e-12  # and finish lands on the mean of the starts


@pytest.mark.parametrize("matrix", ["ring", "complete"])
def test_rounds_follow_the_protocol_and_its_spectral_rate(results, matrix):
    (run,) = [r for r in results if r["check"] == "rounds" and r["matrix"] == matrix]
    w = np.array(run["weights"])
    starts = np.array(run["starts"])
    x, inbox, pub = starts.copy(), np.zeros_like(starts), np.repeat(starts[:1], RANKS, axis=0)
    measured = np.array(run["trajectory"])
    errors = []
    for k, models in enumerate(measured):
        assert np.allclose(models, x, rtol=0, atol=1e-9), f"round {k}"
        errors.append(np.linalg.norm(models - models.mean(axis=0)))
        x, inbox, pub = one_round(x, inbox, pub, w)
    rate = round_map_rate(w)
    if matrix == "ring":  # λ2(W) = 1/3: the one-exchange delay of the inbox makes a round slower
        assert 1 / 3 < rate < 0.6
        observed = (errors[-1] / errors[6]) ** (1 / (len(errors) - 7))
        assert observed == pytest.approx(rate, rel=0.1)
    else:  # λ2(W) = 0: faster than the ring by far
        assert rate < 0.3 and errors[-1] < 1e-4 * errors[0]
    assert run["final_error"] < 1e-9  # and finish still ends at the exact mean
