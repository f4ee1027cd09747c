"""KerasAgent and hva.keras with Sync/LocalSGD on 2 real MPI ranks (one job, several checks)."""

import pytest

from hvdagents.keras.callbacks import warmup_learning_rate
from mpirun import run_job


@pytest.fixture(scope="module")
def checks():
    job = run_job("keras_sync.py", np=2, timeout=300).check()
    return {r["check"]: r for r in job.results()}


def test_ranks_seeded_differently_start_from_rank0(checks):
    assert checks["starts_from_rank0"]["equal"] is True


def test_two_ranks_on_half_batches_equal_one_process_on_full_batches(checks):
    assert checks["equivalence"]["moved"] > 1e-3
    assert checks["equivalence"]["max_rel"] < 1e-5


def test_every_rank_holds_bit_identical_weights(checks):
    assert checks["identical"] == {"check": "identical", "identical": True, "ranks": 2}


def test_localsgd_period_1_equals_sync(checks):
    assert checks["localsgd_equals_sync"]["max_abs"] < 1e-6


def test_metric_average_reports_the_mean_over_ranks(checks):
    # rank r logs loss = r + 1 and acc = 10 r
    assert checks["metric_average"]["logs"] == pytest.approx({"loss": 1.5, "acc": 5.0})


def test_warmup_learning_rate_follows_horovods_formula_batch_by_batch(checks):
    # Horovod's LearningRateWarmupCallback (horovod/_keras/callbacks.py): initial_lr is the
    # scaled rate, reached from initial_lr / size; set before each batch of the warm-up epochs
    size, seen = checks["warmup"]["size"], checks["warmup"]["lr"]
    for key in ("0.0", "0.5", "1.0", "1.9"):
        epoch, batch = map(int, key.split("."))
        expected = 0.1 / size * ((epoch + (batch + 1) / 10) * (size - 1) / 2 + 1)
        assert seen[key] == pytest.approx(expected, rel=1e-6)
        assert seen[key] == pytest.approx(warmup_learning_rate(0.1, size, 2, epoch, batch, 10), rel=1e-6)
    assert seen["0.0"] < 0.1 / size * 1.1  # starts near initial_lr / size, not near initial_lr
    assert seen["1.9"] == pytest.approx(0.1, rel=1e-6)  # the scaled rate, reached exactly
    assert seen["2.0"] == seen["2.5"] == seen["1.9"]  # after the warm-up the rate is left alone


def test_warmup_on_data_of_unknown_length_is_refused(checks):
    assert "Please specify the steps_per_epoch parameter" in checks["warmup"]["unknown_length"]


def test_checkpoint_resume_equals_straight_training(checks):
    assert checks["resume"]["epoch"] == 2
    assert checks["resume"]["moved"] > 1e-3
    assert checks["resume"]["max_abs"] < 1e-6
