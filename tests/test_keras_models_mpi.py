"""KerasAgent on the models users train (tests/scripts/keras_models.py, 2 ranks)."""

import pytest
from consensus import assert_parameters_are_the_promised_consensus

from mpirun import run_job


@pytest.fixture(scope="module")
def results():
    job = run_job("keras_models.py", np=2, timeout=300).check()
    return job.results()


def by_check(results, name):
    return [r for r in results if r["check"] == name]


#: Largest |weight - promised value| after close() (float32 windows and averages against
#: float64 arithmetic in the script).
PARAMS_TOLERANCE = 1e-5


@pytest.mark.parametrize("strategy", ["sync", "localsgd", "downpour", "easgd", "gossip"])
def test_model_after_close_is_the_promised_consensus(results, strategy):
    (result,) = [r for r in by_check(results, "keras_consensus") if r["strategy"] == strategy]
    tolerance = PARAMS_TOLERANCE
    assert result["identical"]  # every weight bit-identical on every rank
    assert_parameters_are_the_promised_consensus(result, strategy, tolerance)
    # BatchNorm's moving statistics: the float64 mean over the ranks, rounded once
    assert result["moving_spread_ulps"] > 100  # the ranks' statistics differed
    assert result["moving_error_ulps"] <= 1.0, result


def test_mixed_precision_trains_like_float32(results):
    (result,) = by_check(results, "mixed_precision")
    f32, mixed = result["float32"], result["mixed"]
    assert f32[-1] < 0.2 * f32[0]  # the task is learnable in float32
    assert mixed[-1] < 2 * f32[-1]
    assert result["inner"] == "LossScaleOptimizer" and result["identical"]


def test_mixed_precision_with_distributed_optimizer_inside_compile_is_reordered(results):
    (result,) = by_check(results, "mixed_precision")
    assert result["user_order"][-1] < 2 * result["float32"][-1]
    assert result["inner_user"] == "LossScaleOptimizer" and result["identical_user"]


def test_mixed_precision_every_rank_skips_the_step_only_one_rank_overflowed(results):
    (result,) = by_check(results, "one_rank_overflows")
    k = result["overflow_batch"]
    assert result["batches"] == 8 and result["identical_every_step"]  # bit-identical after every batch
    assert result["skipped"] == [True, True]  # rank 0's own gradients were finite
    assert result["stepped_before"] == [True, True] and result["stepped_after"] == [True, True]
    for scales in result["scales"]:
        assert scales[k] == scales[k - 1] / 2  # the loss scale halved on every rank
    assert result["scales"][0] == result["scales"][1]


def test_loss_scaling_outside_the_allreduce_is_refused_with_the_fix(results):
    (result,) = by_check(results, "loss_scale_order")
    assert "hva.keras.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(opt))" in result["message"]


def test_uneven_shards_equal_the_documented_padding_reference(results):
    (result,) = by_check(results, "uneven_sync")
    assert result["identical"] and result["epochs"] == 2
    assert result["max_rel"] < 1e-5


def test_uneven_shards_localsgd_ends_in_one_model(results):
    (result,) = by_check(results, "uneven_localsgd")
    assert result["identical"]
