"""Horovod's DistributedOptimizer arguments under Keras 3, 2 ranks against one process
(tests/scripts/keras_dropin.py)."""

import pytest

from mpirun import run_job


@pytest.fixture(scope="module")
def checks():
    job = run_job("keras_dropin.py", np=2, timeout=240).check()
    return {r["check"]: r for r in job.results()}


@pytest.mark.parametrize("case", ["ported_arguments", "passes_sum", "passes_mean", "op_sum", "predivide"])
def test_the_argument_means_what_it_means_in_horovod(checks, case):
    result = checks[case]
    assert result["moved"] > 1e-3 and result["identical"], result
    assert result["max_abs"] < 1e-5, result


def test_fp16_compression_is_close_but_applied(checks):
    assert checks["fp16"]["identical"] and 0 < checks["fp16"]["max_abs"] < 1e-2


def test_two_ways_to_accumulate_that_disagree_are_refused(checks):
    message = checks["conflicting_accumulation"]["message"]
    assert "backward_passes_per_step=2" in message and "gradient_accumulation_steps=3" in message
