"""TorchAgent under hva.DiLoCo on 2 real MPI ranks: one job (tests/scripts/diloco_torch.py)
runs every case; each test reads its RESULT line. The references are float64 and written apart
from the library (tests/scripts/_diloco_reference.py, Sync and LocalSGD themselves)."""

import pytest

from mpirun import Checks, run_job

#: Equal mathematics in float64: DiLoCo's mean of θ_global − θ_local subtracted from θ_global
#: against the strategies' own mean (different rounding only).
EQUAL = 1e-9
#: The outer step against the NumPy reference of its rule.
REFERENCE = 1e-12


@pytest.fixture(scope="module")
def checks():
    return Checks(run_job("diloco_torch.py", np=2, timeout=240))


def test_the_job_runs_every_check_to_the_end(checks):
    checks.job.check()
    assert checks["done"]


@pytest.mark.parametrize("case", ["equals_sync", "equals_localsgd", "frozen_and_buffers", "uneven"])
def test_diloco_with_outer_lr_1_and_no_momentum_is_sync_or_localsgd(checks, case):
    """inner_steps=1: Sync with plain SGD; inner_steps=3: LocalSGD(period=3), 10 steps (a last
    exchange at close), with a frozen layer and BatchNorm buffers (a layer frozen at step 5), and
    with uneven data (rank 1 stops after 7 steps)."""
    result = checks[case]
    assert result["max_diff"] < EQUAL, result
    assert result["moved"] > 0.1 and result["identical"], result


def test_frozen_layers_stay_and_buffers_are_agreed_as_under_localsgd(checks):
    result = checks["frozen_and_buffers"]
    assert result["head_moved"] == 0.0 and result["buffers_moved"] > 1e-3


def test_uneven_data_ends_with_the_longest_ranks_step_count(checks):
    assert checks["uneven"]["step"] == 10


def test_outer_nesterov_step_over_5_rounds_matches_the_reference(checks):
    result = checks["nesterov"]
    assert result["max_diff"] < REFERENCE and result["momentum_diff"] < REFERENCE, result
    assert result["plain_sgd_diff"] > 1e-3  # Nesterov and plain momentum differ by far more than the bar
    assert result["moved"] > 0.1


def test_outer_state_is_the_same_on_every_rank_and_close_leaves_theta_global(checks):
    result = checks["nesterov"]
    assert result["momentum_same"] and result["identical"]
    assert result["close_is_global"] and result["unchanged_by_close"]  # 15 steps: nothing left to send


@pytest.mark.parametrize("case", ["streaming_P2_H4_tau1", "streaming_P3_H6_tau1", "streaming_P2_H4_tau0"])
def test_streaming_fragments_follow_the_reference_schedule_and_rule(checks, case):
    result = checks[case]
    fragments = int(case.split("_P")[1][0])
    assert result["log"] == result["reference_log"]
    assert result["first_window"] == list(range(fragments))  # every fragment once in the first H steps
    assert result["max_diff"] < REFERENCE and result["momentum_diff"] < REFERENCE, result
    assert result["identical"]
    overlap = int(case[-1])
    assert all(applied == sent + overlap for _, sent, applied in result["during_training"])


def test_checkpoint_keeps_the_outer_state_and_resumes_bitwise_on_every_rank(checks):
    result = checks["checkpoint"]
    assert result["epoch"] == 2 and result["step"] == 12
    assert result["momentum_nonzero"] > 1e-3
    assert result["loaded_momentum_bitwise"] == [True, True]
    assert result["rank_bitwise"] == [True, True] and result["momentum_bitwise"] == [True, True]


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_the_wire_dtypes_error_is_within_the_stated_bound(checks, wire):
    result = checks[f"wire_{wire}"]
    assert result["within"], result
    assert result["max_err"] > 0.0  # the wire really rounded


def test_bfloat16_model_trains_with_identical_ranks_and_ends_at_theta_global(checks):
    result = checks["bf16"]
    assert result["dtypes"] == ["torch.bfloat16"]
    assert result["last"] < 0.8 * result["first"]
    assert result["identical"] and result["close_is_global"]


@pytest.mark.parametrize("case", ["digits", "digits_streaming"])
def test_diloco_trains_digits_to_the_bar_of_the_other_strategies(checks, case):
    result = checks[case]
    assert result["accuracy"] >= 0.95, result
    assert result["identical"]
    assert result["exchanges"] >= result["steps"] // 8  # it did exchange, every 8 steps (per fragment: 4)
