"""KerasAgent(ZeRO) on real MPI ranks: equals Sync (float64), refuses what it cannot shard, holds
1/N of the optimizer state, keeps frozen layers and evens out uneven shards as Sync does, and its
checkpoints go 2 ranks -> 3 ranks -> one plain process.
Three launches: tests/scripts/keras_zero.py at 2 ranks (saves) and 3 ranks (loads; 59
parameters make uneven ranges), then tests/scripts/keras_zero_plain.py alone; a fourth runs the
2-rank script on 4 ranks across the two simulated hosts."""

import json
import os
import subprocess
import sys

import pytest

from mpirun import JOB_ENV, SCRIPTS, Checks, run_job

CASES = ["sgd-stage1", "sgd-stage2", "adam-stage1", "adam-stage2", "adamw-stage1", "adamw-stage2",
         "adamw-stage1-clip", "adamw-stage2-clip", "lion-stage2"]
PARAMETERS = 59


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keras_zero")
    two = Checks(run_job("keras_zero.py", np=2, args=[str(directory), "save"], timeout=240))
    three = Checks(run_job("keras_zero.py", np=3, args=[str(directory), "load"], timeout=300))
    plain = subprocess.run([sys.executable, str(SCRIPTS / "keras_zero_plain.py"), str(directory)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, **JOB_ENV})
    return {2: two, 3: three, "plain": plain}


@pytest.mark.parametrize("ranks", [2, 3])
def test_the_jobs_run_every_check_to_the_end(runs, ranks):
    runs[ranks].job.check()


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("case", CASES)
def test_zero_equals_sync_after_training(runs, ranks, case):
    found = runs[ranks][f"equal:{case}"]
    assert found["ranks"] == ranks
    assert found["moved"] > 1e-2  # training changed the parameters
    assert found["max_abs"] < 1e-9
    assert found["identical"] is True  # every rank holds the same bits
    assert found["steps"] == 4  # the inner optimizer's iteration count, read through model.optimizer


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_global_clipnorm_acted_on_the_whole_mean_gradient(runs, ranks, stage):
    assert runs[ranks][f"clip_acted:stage{stage}"]["difference"] > 1e-3  # and equal to Sync's (above)


REFUSED = [("adafactor", "keras.optimizers.Adafactor"), ("subclass", "__main__.MyAdam"),
           ("lossscale", "keras.optimizers.LossScaleOptimizer"),
           ("clipnorm", "keras.optimizers.Adam with clipnorm=1.0")]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("label,named", REFUSED)
def test_optimizers_that_cannot_be_cut_are_refused_on_every_rank(runs, ranks, label, named):
    outcomes = runs[ranks][f"refused:{label}"]["outcomes"]
    assert len(outcomes) == ranks
    for outcome in outcomes:
        assert outcome.startswith(f"UsageError: hva.ZeRO cannot shard {named}:"), outcome
        assert "hva.Sync()" in outcome


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_each_rank_holds_exactly_its_range_of_the_optimizer_state(runs, ranks, stage):
    found = runs[ranks][f"state_bytes:stage{stage}"]
    moments = 2 * 8  # Adam's two float64 moments per element
    scalars = found["sync"] - moments * PARAMETERS  # iteration counters and learning rates, kept whole
    ranges = [PARAMETERS // ranks + (1 if r < PARAMETERS % ranks else 0) for r in range(ranks)]
    assert found["per_rank"] == [scalars + moments * n for n in ranges]
    assert found["user_built"] is False  # the user's optimizer never allocated the whole state


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_layers_equal_sync_and_only_trainable_elements_are_cut(runs, ranks, stage):
    found = runs[ranks][f"frozen:stage{stage}"]  # the first Dense (35 weights) has trainable=False
    assert found["moved"] > 1e-2 and found["max_abs"] < 1e-9 and found["identical"] is True
    assert found["frozen_kept"] is True  # its weights kept their bits
    trainable, moments = 7 * 3 + 3, 2 * 8
    scalars = found["sync"] - moments * trainable  # Sync's state: the 24 trainable elements' moments
    ranges = [trainable // ranks + (1 if r < trainable % ranks else 0) for r in range(ranks)]
    assert found["per_rank"] == [scalars + moments * n for n in ranges]


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_uneven_shards_are_evened_out_and_equal_sync_run_the_same_way(runs, ranks, stage):
    found = runs[ranks][f"uneven:stage{stage}"]  # rank r held 9 + 3r rows, batches of 4, 2 epochs
    longest = -(-(9 + 3 * (ranks - 1)) // 4) * 2
    assert found["sync_steps"] == longest and found["steps"] == [longest] * ranks
    assert found["max_abs"] < 1e-9 and found["identical"] is True


def test_resume_at_the_same_world_size_is_bitwise(runs):
    found = runs[2]["resume"]
    assert found["epoch"] == 3 and found["bitwise"] is True and found["identical"] is True


@pytest.mark.parametrize("label", ["zero1", "sync"])
def test_two_ranks_checkpoint_resumes_on_three_under_zero_and_sync(runs, label):
    found = runs[3][f"load:{label}"]
    assert found["epoch"] == 3 and found["identical"] is True
    assert found["max_abs"] < 1e-9  # the 2-rank straight run's parameters after step 6


def test_a_sync_checkpoint_resumes_under_zero(runs):
    found = runs[3]["load:from_sync"]
    assert found["epoch"] == 6 and found["identical"] is True
    assert found["max_abs"] < 1e-9  # Sync's own parameters 3 steps after it saved


def test_three_ranks_checkpoint_resumes_in_a_plain_process(runs):
    plain = runs["plain"]
    assert plain.returncode == 0, plain.stdout + plain.stderr
    found = next(json.loads(line[len("RESULT "):]) for line in plain.stdout.splitlines()
                 if line.startswith("RESULT "))
    assert found["size"] == 1 and found["epoch"] == 6
    assert found["loaded_bitwise"] is True  # the file holds the parameters the 3 ranks had
    assert found["steps"] == 9  # Adam's step count went on from the saved 6
    assert found["max_abs"] < 1e-9  # equal to the 2-rank straight run after step 9


# The 2-rank script on 4 ranks across the two simulated hosts (2 x 2, TCP between them): every
# check above that it makes (59 % 4 == 3: uneven ranges), with the same assertions.
@pytest.fixture(scope="module")
def across_hosts(two_hosts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("keras_zero_hosts")
    return Checks(two_hosts.run(two_hosts.mpirun(SCRIPTS / "keras_zero.py", 2, [str(directory), "save"]),
                                timeout=420))


def test_zero_equals_sync_on_four_ranks_across_hosts_in_every_check(across_hosts):
    across_hosts.job.check()
    runs = {4: across_hosts}
    for case in CASES:
        test_zero_equals_sync_after_training(runs, 4, case)
    for stage in (1, 2):
        test_global_clipnorm_acted_on_the_whole_mean_gradient(runs, 4, stage)
        test_each_rank_holds_exactly_its_range_of_the_optimizer_state(runs, 4, stage)
        test_frozen_layers_equal_sync_and_only_trainable_elements_are_cut(runs, 4, stage)
        test_uneven_shards_are_evened_out_and_equal_sync_run_the_same_way(runs, 4, stage)
    for label, named in REFUSED:
        test_optimizers_that_cannot_be_cut_are_refused_on_every_rank(runs, 4, label, named)
    assert across_hosts["resume"]["ranks"] == 4
    test_resume_at_the_same_world_size_is_bitwise({2: across_hosts})
