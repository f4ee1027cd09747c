"""Training loops written as for one process, with TorchAgent added (tests/scripts/torch_loops.py,
2 ranks): each equals one process on the concatenated batch (float64) with bit-identical ranks,
or is refused at the step where it happens."""

import pytest

from mpirun import run_job

#: Float64 reference bar: the same arithmetic up to summation order.
EXACT = 1e-9


@pytest.fixture(scope="module")
def checks():
    job = run_job("torch_loops.py", np=2, timeout=240).check()
    return {r["check"]: r for r in job.results()}


@pytest.mark.parametrize("case", ["clip", "grad_scaler", "two_backwards", "no_sync", "gan", "sparse",
                                  "channels_last", "lbfgs", "compiled"])
def test_the_loop_equals_one_process_on_the_full_batch(checks, case):
    result = checks[case]
    assert result["max_rel"] < EXACT, result
    assert result["identical"], result
    if "moved" in result:
        assert result["moved"] > 1e-3, result  # training did change the parameters


def test_grad_scaler_skips_the_infinite_step_on_every_rank_as_one_process_does(checks):
    ours, reference = checks["grad_scaler_scales"]["scales"]
    assert ours == reference == 2.0 ** 9  # one skipped step halved the initial 2**10


def test_sparse_and_channels_last_gradients_keep_their_layout(checks):
    assert checks["sparse"]["still_sparse"]  # sparse optimizers still see a sparse gradient
    assert checks["channels_last"]["strided"]  # the case really had non-contiguous gradients


def test_a_backward_pass_beyond_backward_passes_per_step_is_refused_at_that_pass(checks):
    message = checks["extra_pass"]["message"]
    assert "backward pass 3" in message and "backward_passes_per_step=2" in message
    assert "no_sync()" in message  # both ways to accumulate are named


def test_passes_count_again_after_zero_grad_as_after_a_skipped_step(checks):
    assert checks["passes_restart_after_zero_grad"]["identical"]


def test_stepping_twice_without_a_backward_is_refused_before_the_update(checks):
    result = checks["step_twice"]
    assert "no backward pass ran since the last step" in result["message"]
    assert result["unchanged"]


def test_a_step_after_passes_only_inside_no_sync_is_refused(checks):
    assert "only accumulated inside `with agent.no_sync():`" in checks["no_sync_only"]["message"]


def test_fp16_compression_scales_before_the_sum_so_it_does_not_overflow(checks):
    result = checks["fp16_range"]
    assert result["finite"]
    assert abs(result["bias_grad"] - result["reference_grad"]) <= 1e-3 * result["reference_grad"], result


def test_a_closed_agent_leaves_no_hook_and_a_new_one_starts_clean(checks):
    result = checks["sync_then_localsgd"]
    assert result["hooks_while_open"] == 4 and result["hooks_after"] == 0
    assert result["max_rel"] < EXACT and result["identical"]  # LocalSGD, not averaged gradients


def test_localsgd_follows_the_trainable_set(checks):
    result = checks["follow_localsgd"]
    assert result["frozen_kept"] and result["unfrozen_moved"] > 1e-3
    assert result["identical"] and result["max_rel"] < EXACT


def test_asynchronous_strategies_share_frozen_layers_and_keep_them_exactly(checks):
    result = checks["follow_easgd"]
    assert result["shared"] and result["frozen_kept"]
    assert result["unfrozen_moved"] > 1e-3 and result["identical"]


def test_accidents_leave_the_agent_right_or_refused(checks):
    result = checks["accidents"]
    assert "only accumulated inside `with agent.no_sync():`" in result["no_sync_after_mean"]
    assert "averaged by another open TorchAgent(Sync)" in result["shared_refused"]
    assert result["hooks_left_by_refused_agent"] == 0
