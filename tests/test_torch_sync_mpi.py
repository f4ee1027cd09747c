"""TorchAgent with Sync/LocalSGD on 2 real MPI ranks (one job, several checks)."""

import pytest

from mpirun import Checks, run_job

MISMATCHES = {  # case -> what the error must name (rank 0's, then rank 1's)
    "names": ["parameter 2 is 'head.weight' on rank 0 but 'out.weight' on rank(s) 1"],
    "dtypes": ["parameter 'head.weight' has shape (1, 4) float64 on rank 0 but shape (1, 4) float32 on rank(s) 1"],
    "extra_buffer": ["rank(s) 1 have extra parameter 'shift' that rank 0 lacks"],
    "buffer_dtype": ["parameter 'scale' has shape (4,) float64 on rank 0 but shape (4,) float32 on rank(s) 1"],
}


@pytest.fixture(scope="module")
def checks():
    return Checks(run_job("torch_sync.py", np=2, timeout=180))


def test_the_job_runs_every_check_to_the_end(checks):
    checks.job.check()


def test_ranks_seeded_differently_start_from_rank0(checks):
    assert checks["starts_from_rank0"]["equal"] is True


@pytest.mark.parametrize("part", ["parameters", "buffers", "optimizer"])
def test_ranks_start_from_rank0s_parameters_buffers_and_optimizer_state(checks, part):
    state = checks["starts_from_rank0_state"]
    assert state[f"{part}_differed"]  # before the agent the ranks held different tensors
    assert state[f"{part}_equal"]  # after it every rank holds rank 0's, bitwise


def test_two_ranks_on_half_batches_equal_one_process_on_full_batches(checks):
    assert checks["equivalence"]["moved"] > 1e-3  # training did change the parameters
    assert checks["equivalence"]["max_rel"] < 1e-10


def test_every_rank_holds_bit_identical_parameters(checks):
    assert checks["identical"] == {"check": "identical", "identical": True, "ranks": 2}


@pytest.mark.parametrize("run", ["identical_every_step", "identical_every_step_momentum"])
def test_ranks_are_bit_identical_after_every_step_not_only_the_last(checks, run):
    found = checks[run]
    steps = 6 if run == "identical_every_step" else 18
    assert found["ranks"] == 2 and found["hashes"] == 2 * steps  # gradients after backward, state after step
    assert found["distinct"] == found["hashes"]  # every step changed what was hashed
    assert found["identical"]


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


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_models_differing_in_names_dtypes_or_buffers_are_refused_on_every_rank_before_any_collective(checks, case):
    found = checks[f"mismatch_{case}"]
    assert len(found["outcomes"]) == 2
    for outcome in found["outcomes"]:
        assert outcome.startswith("ModelMismatchError: the model differs between ranks"), outcome
        for named in MISMATCHES[case]:
            assert named in outcome, outcome
    assert found["untouched"] == [True, True]  # nothing was broadcast: rank 1 kept its own tensors


def test_windows_whose_probe_totals_come_back_wrong_are_refused_on_every_rank(checks):
    outcomes = checks["probe_refuses_wrong_totals"]["outcomes"]
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.startswith("OneSidedUnavailableError: one-sided windows are not safe in this job"), outcome
        assert "a one-sided probe lost or corrupted updates" in outcome, outcome
        assert "HVDAGENTS_WINDOWS at auto" in outcome and "Sync" in outcome, outcome  # the fixes
    assert outcomes[0] == outcomes[1]  # the same verdict (the first rank's problem) everywhere
