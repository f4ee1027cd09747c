"""TorchAgent(ZeRO) on real MPI ranks: equals Sync (float64), refuses what it cannot shard, holds
1/N of the optimizer state, and its checkpoints go 2 ranks -> 4 ranks -> one plain process.
Three launches: tests/scripts/torch_zero.py at 2 ranks (saves) and 4 ranks (loads), then
tests/scripts/torch_zero_plain.py alone."""

import json
import subprocess
import sys

import pytest

from mpirun import SCRIPTS, Checks, run_job

STEPS = 5  # tests/scripts/torch_zero.py's training steps per case

CASES = ["sgd-stage1", "sgd-stage2", "adam-stage1", "adam-stage2", "adamw-stage1", "adamw-stage2",
         "adam-stage1-clip", "adam-stage2-clip", "sgd-stage1-freeze", "adamw-stage2-freeze",
         "adam-stage2-mixed", "adamw-stage1-rounds", "sgd-stage2-rounds", "adam-stage1-scaler",
         "adam-stage2-chunks", "sgd-stage1-chunks-rounds", "adamw-stage2-chunks-freeze",
         "adam-stage2-chunks-partial", "sgd-stage1-partial", "adam-stage2-accumulate", "adamw-stage1-accumulate",
         "adamw-stage2-add_group", "sgd-stage1-add_group", "sgd-stage2-chunks"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero")
    two = Checks(run_job("torch_zero.py", np=2, args=[str(directory), "save"], timeout=240))
    four = Checks(run_job("torch_zero.py", np=4, args=[str(directory), "load"], timeout=300))
    plain = subprocess.run([sys.executable, str(SCRIPTS / "torch_zero_plain.py"), str(directory)],
                           capture_output=True, text=True, timeout=120)
    return {2: two, 4: four, "plain": plain}


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_jobs_run_every_check_to_the_end(runs, ranks):
    runs[ranks].job.check()


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_zero_equals_sync_after_every_step_of_training(runs, ranks, case):
    found = runs[ranks][f"equal:{case}"]
    assert found["ranks"] == ranks
    assert found["moved"] > 1e-2  # training changed the parameters
    assert found["max_abs"] < found["tol"]  # 1e-9 in float64, 1e-6 with a float32 layer
    assert found["identical"] is True  # every rank holds the same bits
    assert found["user_state"] == 0  # the user's optimizer holds no state: the ranges do
    if "clip" in case:
        assert max(found["ref_norms"]) > 0.05  # the norm was above max_norm: clipping acted
        assert found["norms"] == pytest.approx(found["ref_norms"], rel=1e-9)  # the global norm, not a rank's
    if "scaler" in case:  # rank 1 overflowed at step 2: every rank skipped it and halved the scale
        assert found["norms"] == found["ref_norms"] == [16.0, 16.0, 8.0, 8.0, 8.0]
    if "freeze" in case:
        assert found["frozen_kept"] is True  # frozen parameters kept their bits
    # two param groups of one bucket each; with 30-element buckets the first group's weight
    # (35) and bias (7) are a bucket each: [w0], [b0], [w1 b1]; with 21, every parameter is
    # one, the last bias of 3 elements on 4 ranks too: [w0], [b0], [w1], [b1]
    assert found["buckets"] == {None: 2, 30: 3, 21: 4}[found["chunks"]]
    if "accumulate" in case:  # one pass inside no_sync() before each step's own
        assert found["ref_norms"] == []
    if "stage2" in case:
        assert found["grads_none"] is True  # no partial gradient for a local norm to misread
        # reduced and freed during backward, not at its end (layer 0 frozen: no hook); with
        # accumulation, kept in the pass inside no_sync(); a group added at step 2 is hooked
        # from the pass after (step 2's is reduced at the end of backward)
        freed = [True] * (STEPS - 2 if "freeze" in case else STEPS)
        if "accumulate" in case:
            freed = [False, True] * STEPS
        if "add_group" in case:
            freed = [True, True, False, True, True]
        assert found["freed_in_backward"] == freed
    elif "freeze" not in case and "add_group" not in case:  # (frozen layers have no gradient)
        assert found["grads_full"] is True


@pytest.mark.parametrize("ranks", [2, 4])
def test_gradscaler_under_stage_2_stops_on_every_rank_with_pytorchs_error(runs, ranks):
    outcomes = runs[ranks]["scaler:stage2"]["outcomes"]
    assert outcomes == ["AssertionError: No inf checks were recorded for this optimizer."] * ranks


@pytest.mark.parametrize("ranks", [2, 4])
def test_stage_2_counts_a_gradient_accumulated_twice_in_one_backward_whole(runs, ranks):
    found = runs[ranks]["reentrant:stage2"]  # reentrant checkpointing: layer 0 in and out of the segment
    assert found["moved"] > 1e-2
    assert found["max_abs"] < 1e-9  # one process on the whole batch
    assert found["identical"] is True


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("label,named", [("lbfgs", "torch.optim.lbfgs.LBFGS"), ("subclass", "__main__.MyAdam"),
                                         ("adafactor", "torch.optim.Adafactor")])
def test_optimizers_that_cannot_be_cut_are_refused_on_every_rank(runs, ranks, label, named):
    outcomes = runs[ranks][f"refused:{label}"]["outcomes"]
    assert len(outcomes) == ranks
    for outcome in outcomes:
        assert outcome.startswith(f"UsageError: hva.ZeRO cannot shard {named}:"), outcome
        assert "Use hva.Sync()" in outcome


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_each_rank_holds_exactly_its_range_of_the_optimizer_state(runs, ranks, stage):
    found = runs[ranks][f"state_bytes:stage{stage}"]
    assert found["per_rank"] == found["expected"]  # Adam's two moments for this rank's range only
    assert sum(found["per_rank"]) == found["sync_elements"]  # together: Sync's state, once
    assert max(found["per_rank"]) - min(found["per_rank"]) <= 2 * 2  # 1 element per group, 2 moments
    assert found["user_state"] == 0


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_a_rank_that_runs_out_of_data_serves_the_others_to_sync_s_result(runs, ranks, stage):
    found = runs[ranks][f"uneven:stage{stage}"]  # rank r closed after 3 + r steps
    assert found["max_abs"] < 1e-9  # every rank: Sync's parameters (the longest rank's), float64
    assert found["identical"] is True
    assert found["runners"] == [found["sync_runner"]] * ranks  # the longest rank's step count on every rank
    assert found["sync_runner"]["step"] == 3 + ranks - 1
    assert found["state_max_abs"] < 1e-9  # the gathered Adam state: Sync's longest rank's
    assert found["steps"] == [3 + ranks - 1]  # every range stepped to the end


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_at_the_same_world_size_is_bitwise(runs, stage):
    found = runs[2][f"resume:stage{stage}"]
    assert found["epoch"] == 3 and found["bitwise"] is True and found["identical"] is True


def test_the_checkpoint_holds_the_whole_optimizer_state(runs):
    found = runs[2]["saved_state"]
    assert found["shapes"] == {"0": {"step": [], "exp_avg": [7, 5], "exp_avg_sq": [7, 5]},
                               "1": {"step": [], "exp_avg": [7], "exp_avg_sq": [7]},
                               "2": {"step": [], "exp_avg": [3, 7], "exp_avg_sq": [3, 7]},
                               "3": {"step": [], "exp_avg": [3], "exp_avg_sq": [3]}}
    assert found["lrs"] == [0.02, 0.03]  # each group's own hyper-parameters


@pytest.mark.parametrize("label", ["zero1", "sync"])
def test_two_ranks_checkpoint_resumes_on_four_under_zero_and_sync(runs, label):
    found = runs[4][f"load:{label}"]
    assert found["epoch"] == 3 and found["identical"] is True
    assert found["max_abs"] < 1e-9  # the 2-rank straight run's parameters after step 6


def test_four_ranks_checkpoint_resumes_in_a_plain_process(runs):
    plain = runs["plain"]
    assert plain.returncode == 0, plain.stdout + plain.stderr
    result = next(json.loads(line[len("RESULT "):]) for line in plain.stdout.splitlines()
                  if line.startswith("RESULT "))
    assert result["hvdagents_imported"] is False and result["epoch"] == 6
    assert result["loaded_bitwise"] is True  # the file holds the parameters the 4 ranks had
    assert result["steps"] == [9, 9, 9, 9]  # Adam's step counts went on from the saved 6
    assert result["max_abs"] < 1e-9  # equal to the 2-rank straight run after step 9


# The same script across the two simulated hosts (2 x 2 ranks, TCP between them): every case of
# ZeRO against Sync, and each rank's exact share of the optimizer state.
@pytest.fixture(scope="module")
def across_hosts(two_hosts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("zero_hosts")
    return Checks(two_hosts.run(two_hosts.mpirun(SCRIPTS / "torch_zero.py", 2, [str(directory), "save"]),
                                timeout=300))


def test_zero_equals_sync_across_hosts_in_every_case(across_hosts):
    across_hosts.job.check()
    for case in CASES:
        found = across_hosts[f"equal:{case}"]
        assert found["ranks"] == 4
        assert found["max_abs"] < found["tol"], (case, found)
        assert found["identical"] is True, case
    for stage in (1, 2):
        found = across_hosts[f"state_bytes:stage{stage}"]
        assert found["per_rank"] == found["expected"] and sum(found["per_rank"]) == found["sync_elements"]
