"""Everyday Keras under hvdagents, 2 ranks (tests/scripts/keras_everyday.py)."""

import pytest

from mpirun import run_job


@pytest.fixture(scope="module")
def checks():
    job = run_job("keras_everyday.py", np=2, timeout=240).check()
    return {r["check"]: r for r in job.results()}


def test_a_custom_train_step_with_two_distributed_optimizers_equals_one_process(checks):
    result = checks["two_optimizers"]
    assert result["moved"] > 1e-3 and result["identical"], result
    assert result["max_abs"] < 1e-5, result


def test_steps_per_execution_counts_every_optimizer_step(checks):
    result = checks["steps_per_execution"]
    assert result["iterations"] == 12  # 2 epochs x 6 batches
    assert result["counted"] == 12 and result["last_sync"] == 12, result  # LocalSGD's period saw them all


def test_a_rank_whose_layers_keras_numbered_on_is_not_refused(checks):
    # rank 0 built another model first, so its layer names differ from rank 1's: same architecture,
    # and the agent above was made and trained
    rank0, rank1 = checks["steps_per_execution"]["layer_paths"]
    assert rank0 != rank1 and len(rank0) == len(rank1) == 4
