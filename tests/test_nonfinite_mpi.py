"""No non-finite value spreads silently.

Rank 1's parameter ``2.weight`` turns NaN at step 3 (``tests/scripts/nonfinite.py``); the
exchange after that step refuses to share it: ``NonFiniteError`` on rank 1 naming the strategy,
the step and the parameter, which ends the job. Nothing reached the shared state: rank 1 reads
the centre (or every Gossip model) after the refusal and finds it finite, and rank 0, pulling
from it the whole time, never held a NaN. One job per strategy."""

import re

import pytest

from mpirun import run_job

TIMEOUT_S = 60  # a hang


@pytest.mark.parametrize("strategy,name", [("downpour", "Downpour"), ("easgd", "EASGD"), ("gossip", "Gossip")])
def test_a_nonfinite_push_is_refused_and_ends_the_job(strategy, name):
    job = run_job("nonfinite.py", np=2, args=[strategy], timeout=TIMEOUT_S)
    assert not job.timed_out, f"the job hung:\n{job.output[-3000:]}"
    assert job.returncode != 0, job.output[-3000:]
    assert "[rank 1]" in job.stderr, job.output[-3000:]
    assert re.search(rf"NonFiniteError: {name} at step 3: .* parameter '2\.weight'", job.stderr), job.output[-3000:]
    assert "SHARED_FINITE True" in job.stdout, job.output[-3000:]
    assert "RANK0_NONFINITE" not in job.stdout, job.output[-3000:]
    assert "DONE rank 0" not in job.stdout  # rank 0's close() never completed: the job was ended


def test_sync_with_nonfinite_raise_refuses_the_step_on_every_rank():
    job = run_job("nonfinite.py", np=2, args=["sync"], timeout=TIMEOUT_S)
    assert not job.timed_out, f"the job hung:\n{job.output[-3000:]}"
    assert job.returncode != 0, job.output[-3000:]
    for rank in (0, 1):
        assert f"REFUSED rank {rank} step 3 finite-and-unchanged True" in job.stdout, job.output[-3000:]
    assert re.search(r"NonFiniteError: Sync at step 3: the averaged gradient .* parameter '2\.weight'; "
                     "the optimizer step was not taken", job.stderr), job.output[-3000:]
    assert "DONE rank" not in job.stdout
