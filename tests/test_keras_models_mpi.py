"""KerasAgent on the models users train (tests/scripts/keras_models.py, 2 ranks)."""

import pytest

from mpirun import run_job


@pytest.fixture(scope="module")
def results():
    job = run_job("keras_models.py", np=2, timeout=300).check()
    return job.results()


def by_check(results, name):
    return [r for r in results if r["check"] == name]


@pytest.mark.parametrize("strategy", ["sync", "localsgd", "downpour", "easgd", "gossip"])
def test_batchnorm_statistics_are_identical_after_close(results, strategy):
    (result,) = [r for r in by_check(results, "keras_consensus") if r["strategy"] == strategy]
    assert result["differed_before"] and result["identical"]


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
