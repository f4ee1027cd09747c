"""TorchAgent with Sync/LocalSGD on 2 real MPI ranks (one job, several checks)."""

import pytest

from mpirun import run_job


@pytest.fixture(scope="module")
def checks():
    job = run_job("torch_sync.py", np=2, timeout=180).check()
    return {r["check"]: r for r in job.results()}


def test_ranks_seeded_differently_start_from_rank0(checks):
    assert checks["starts_from_rank0"]["equal"] is True


def test_two_ranks_on_half_batches_equal_one_process_on_full_batches(checks):
    assert checks["equivalence"]["moved"] > 1e-3  # training did change the parameters
    assert checks["equivalence"]["max_rel"] < 1e-10


def test_every_rank_holds_bit_identical_parameters(checks):
    assert checks["identical"] == {"check": "identical", "identical": True, "ranks": 2}


def test_localsgd_period_1_equals_sync(checks):
    assert checks["localsgd_equals_sync"]["max_abs"] < 1e-12


def test_checkpoint_resume_is_bitwise_equal_to_straight_training(checks):
    assert checks["resume"]["epoch"] == 2
    assert checks["resume"]["bitwise"] is True


def test_fp16_compression_is_applied_and_stays_close(checks):
    assert 0 < checks["fp16"]["max_abs"] < 1e-2


def test_backward_passes_per_step_accumulates_before_one_allreduce(checks):
    assert checks["backward_passes"]["max_rel"] < 1e-10


def test_zero_grad_between_backward_and_step_drops_the_step_as_in_one_process(checks):
    # the mean gradient is in .grad when backward returns: nothing is in flight to race with
    assert checks["zero_grad_before_step"] == {"check": "zero_grad_before_step", "message": "no error",
                                               "unchanged": True}
