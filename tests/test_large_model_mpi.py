"""State of any size travels whole (2 ranks): a model past MPI's 2 GiB message limit, and the
same paths in many pieces at small sizes (tests/scripts/large_model.py says what is checked).

600M float32 parameters are 2.4 GB, and SGD's momentum one more copy: before hvdagents
broadcast state tensor by tensor, rank 0's state went through one pickled ``bcast`` and Open
MPI refused it. The script compares every element of the parameter, its momentum and a buffer
with the exact expected value after construction, a step, a checkpoint resumed and ``close()``;
here the float64 sums it reports are checked against the same values computed independently."""

import numpy as np
import pytest

from mpirun import run_job

PERIOD, RANKS = 1000, 2
P = (np.arange(PERIOD) - 500) / 8  # the script's rows: rank 0's parameter, the gradient's
C = (np.arange(PERIOD) % 7 + 1) / 4


def expected_sums(strategy, n, buffer_n):
    """The float64 sums of the model the script must end with, from its formulas: rank 0's
    parameter P after its own step (momentum C, lr = momentum = 1/2), a step through the agent
    with gradient factors 1 and 3 (Sync: their mean; otherwise rank 0's own), the buffer the
    mean of (r + 1) P + r over the ranks."""
    k = np.mean([2 * r + 1 for r in range(RANKS)]) if strategy == "sync" else 1.0
    momentum = 0.5 * C + k * C
    weight = P - 0.5 * C - 0.5 * momentum
    closed = P - 0.5 * C if strategy == "easgd" else weight  # EASGD ends on the centre
    rows, buffer_rows = n // PERIOD, buffer_n // PERIOD
    return {"weight": rows * weight.sum(), "momentum": rows * momentum.sum(), "closed_weight": rows * closed.sum(),
            "closed_buffer": buffer_rows * np.mean([(r + 1) * P + r for r in range(RANKS)], axis=0).sum()}


def _check(result, n, buffer_n, strategies):
    assert result["n"] == n and result["ranks"] == RANKS
    assert list(result["strategies"]) == strategies
    for name, found in result["strategies"].items():
        assert found["failed"] == {}, (name, found["failed"])  # rank -> checks whose tensors differed
        assert found["sums"] == pytest.approx(expected_sums(name, n, buffer_n), rel=1e-12), name


def test_a_600m_parameter_model_with_its_momentum_starts_steps_resumes_and_closes_whole(tmp_path):
    # 2 x ~12 GB at its peak (parameter, gradient, momentum, the momentum received and the
    # checkpoint read back); RESULT's "phases" give seconds and peak MiB after each check.
    # Sync only: the other strategies take the same broadcasts, in many pieces in the test below
    n, buffer_n = 600_000_000, 5_000_000  # the buffer: 2 of mean_over_ranks' float64 pieces
    job = run_job("large_model.py", np=RANKS, args=[str(n), str(buffer_n), str(tmp_path), "sync"], timeout=600)
    (result,) = job.check().results()
    _check(result, n, buffer_n, ["sync"])
    assert result["piece_bytes"] == 1 << 30  # the library's own: 2.4 GB goes in 3 pieces


def test_state_in_many_pieces_travels_whole_under_every_kind_of_strategy(tmp_path):
    # pieces of 12,006 bytes (not whole float32s: a parameter of 48,000 bytes in 4 pieces, the
    # last a short one), buffer means in pieces of 777 elements (3,000 in 4)
    n, buffer_n, strategies = 12_000, 3_000, ["sync", "localsgd", "easgd"]
    job = run_job("large_model.py", np=RANKS, timeout=120,
                  args=[str(n), str(buffer_n), str(tmp_path), ",".join(strategies),
                        "--piece-bytes", "12006", "--mean-piece", "777"])
    (result,) = job.check().results()
    _check(result, n, buffer_n, strategies)
    assert result["piece_bytes"] == 12006 and result["mean_piece"] == 777
