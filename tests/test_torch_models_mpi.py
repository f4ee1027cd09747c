"""TorchAgent(Sync) on the models users train (tests/scripts/torch_models.py, 2 ranks)."""

import pytest

from mpirun import Checks, run_job

STRATEGIES = ["sync", "localsgd", "downpour", "easgd", "gossip"]


@pytest.fixture(scope="module")
def checks():
    return Checks(run_job("torch_models.py", np=2, timeout=180))


def test_the_job_runs_every_check_to_the_end(checks):
    checks.job.check()


def test_frozen_layer_fine_tuning_equals_one_process_on_the_full_batch(checks):
    frozen = checks["frozen"]
    assert frozen["max_rel"] < 1e-10
    assert frozen["body_moved"] == 0.0 and frozen["head_moved"] > 1e-3
    assert frozen["identical"]


def test_a_parameter_no_rank_has_a_gradient_for_is_not_moved_by_momentum_or_weight_decay(checks):
    assert checks["frozen"]["unused_moved"] == 0.0


def test_unfrozen_parameters_are_averaged_from_the_step_they_join(checks):
    unfreeze = checks["unfreeze"]
    assert unfreeze["identical"]
    assert unfreeze["body_moved"] > 1e-3
    assert unfreeze["max_rel"] < 1e-10


@pytest.mark.parametrize("case", ["bf16", "mixed_dtypes"])
def test_bfloat16_and_mixed_dtype_models_train_with_identical_ranks(checks, case):
    result = checks[case]
    assert result["identical"] and result["start_exact"]
    assert result["last"] < 0.8 * result["first"]
    assert "torch.bfloat16" in result["dtypes"]
    assert len(result["dtypes"]) == (2 if case == "mixed_dtypes" else 1)
    assert result["shared_as"] == "float32"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float16_models_train_under_every_strategy_with_identical_ranks(checks, strategy):
    result = checks[f"float16_{strategy}"]
    assert result["dtypes"] == ["torch.float16"]
    assert result["identical"] and result["start_exact"]
    assert result["last"] < 0.8 * result["first"]
    assert result["shared_as"] == "float32"  # no float64 parameter: float32 (holds float16 exactly)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_and_float64_parameters_train_under_every_strategy_the_float64_ones_in_float64(checks, strategy):
    result = checks[f"float32_float64_{strategy}"]
    assert result["dtypes"] == ["torch.float32", "torch.float64"]
    assert result["identical"]
    assert result["last"] < 0.8 * result["first"]
    assert result["shared_as"] == "float64"  # a float64 parameter: everything shared in float64
    # rank 0's float64 values (off float32's grid) reached every rank exactly, through the
    # asynchronous strategies' windows too
    assert result["start_exact"]
    # and they trained in float64: through float32 every value would be on float32's grid
    assert result["float64_off_float32_grid"] > 0.5


def test_uneven_data_sync_averages_over_the_ranks_still_training(checks):
    uneven = checks["uneven_sync"]
    assert uneven["identical"]
    assert uneven["max_rel"] < 1e-10


def test_uneven_data_every_rank_takes_the_optimizer_and_strategy_state_of_the_rank_with_most_steps(checks):
    uneven = checks["uneven_sync"]
    assert uneven["optimizer_differed_before_close"]  # rank 0 stopped a step early
    assert uneven["optimizer_identical"]
    assert uneven["optimizer_sizes"][0] == uneven["optimizer_sizes"][1] > 0
    assert uneven["optimizer_max_rel"] < 1e-10  # Adam's moments and steps: the longest rank's
    assert uneven["runner_states"] == [{"step": 4, "last_sync_step": 4}] * 2


def test_a_gradient_on_one_rank_only_counts_as_zero_on_the_others(checks):
    uneven = checks["uneven_sync"]
    assert uneven["side_steps"] == 3  # both ranks trained: rank 0's gradient / 2 on every rank
    assert uneven["side_identical"]
    assert uneven["side_max_rel"] < 1e-12


@pytest.mark.parametrize("period", [2, 3])
def test_uneven_data_localsgd_ends_in_one_model(checks, period):
    """Rank r has 3 + r batches; every rank must end with the model and momentum of the
    reference: averages over the ranks still training, then the longest rank's state."""
    uneven = checks[f"uneven_localsgd_period{period}"]
    assert uneven["differed_before_close"]  # rank 0 made a local step that rank 1 did not
    assert uneven["identical"]
    assert len(uneven["max_rel"]) == 2 and max(uneven["max_rel"]) < 1e-10  # on every rank
    assert uneven["moved"] > 1e-3
    sizes = uneven["optimizer_sizes"]
    assert sizes[0] == sizes[1] == sizes[2] > 0
    assert len(uneven["optimizer_max_rel"]) == 2 and max(uneven["optimizer_max_rel"]) < 1e-10
    # the longest rank's counters (4 steps, not rank 0's 3), the last one an average
    assert uneven["reference_runner_state"] == {"step": 4, "last_sync_step": 4}
    assert uneven["runner_states"] == [uneven["reference_runner_state"]] * 2


def test_the_users_optimizer_object_is_used_as_it_is(checks):
    assert checks["custom_optimizer"] == {"check": "custom_optimizer", "identical": True, "same_object": True}


def test_ranks_training_different_parameter_sets_get_an_error_not_a_hang(checks):
    assert "the ranks train different sets of parameters" in checks["different_trainable_sets"]["message"]
