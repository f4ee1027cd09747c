"""KerasAgent under hva.DiLoCo on 2 real MPI ranks: one job (tests/scripts/diloco_keras.py)
runs every case (float64 models, floatx float64); each test reads its RESULT line."""

import pytest

from mpirun import Checks, run_job

#: Equal mathematics in float64, different rounding only.
EQUAL = 1e-9
#: The outer step against the NumPy reference of its rule (tests/scripts/_diloco_reference.py).
REFERENCE = 1e-12


@pytest.fixture(scope="module")
def checks():
    return Checks(run_job("diloco_keras.py", np=2, timeout=240))


def test_the_job_runs_every_check_to_the_end(checks):
    checks.job.check()
    assert checks["done"]


@pytest.mark.parametrize("case", ["equals_sync", "equals_localsgd"])
def test_diloco_with_outer_lr_1_and_no_momentum_is_sync_or_localsgd(checks, case):
    """inner_steps=1 against Sync (plain SGD, 7 steps); inner_steps=3 against LocalSGD(period=3)
    (SGD with momentum, 10 steps: a last exchange at close)."""
    result = checks[case]
    assert result["max_diff"] < EQUAL, result
    assert result["moved"] > 0.1 and result["identical"]


@pytest.mark.parametrize("case", ["nesterov", "streaming_P2_H4_tau1"])
def test_outer_step_and_streaming_schedule_match_the_reference(checks, case):
    """5 rounds of the outer Nesterov step; 2 fragments overlapped with one inner step (the
    all-reduce runs on the agent's worker thread while Keras trains)."""
    result = checks[case]
    assert result["log"] == result["reference_log"]
    assert result["max_diff"] < REFERENCE and result["momentum_diff"] < REFERENCE, result
    assert result["moved"] > 0.1
    assert result["momentum_same"] and result["identical"] and result["close_is_global"]


def test_checkpoint_keeps_the_outer_state_and_resumes_exactly(checks):
    result = checks["checkpoint"]
    assert result["epoch"] == 2 and result["step"] == 12 and result["momentum_nonzero"] > 1e-3
    assert result["loaded_momentum_bitwise"] == [True, True]
    assert result["max_diff"] == [0.0, 0.0] and result["momentum_diff"] == [0.0, 0.0]


def test_the_float16_wire_error_is_within_the_stated_bound(checks):
    result = checks["wire_float16"]
    assert result["within"], result
    assert result["max_err"] > 0.0


def test_diloco_trains_digits_to_the_bar_of_the_other_strategies(checks):
    result = checks["digits"]
    assert result["accuracy"] >= 0.95, result
    assert result["identical"]
    assert result["exchanges"] >= result["steps"] // 8
