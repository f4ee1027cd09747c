"""The asynchronous strategies in real MPI jobs, on a real tiny NumPy model that pulls every
rank towards its own target. One job per world size (tests/scripts/weak_job.py) runs every
case; the tests below read its RESULT lines, case by case."""

import pytest

from mpirun import run_job

#: Hard limit per job; each takes several seconds.
JOB_TIMEOUT = 240
STEPS = 300
STRATEGIES = ["downpour", "downpour-ssp", "easgd", "gossip", "gossip-ring"]
#: What each world's job runs besides the contract of every strategy.
PARTS = {1: ["lifecycle"], 2: ["lifecycle"], 4: ["straggler"]}


@pytest.fixture(scope="module")
def weak_job():
    """``weak_job(np_)``: the RESULT lines of the job on ``np_`` ranks, run once per module.
    A world of one runs as plain ``python script`` (no launcher), larger worlds under mpirun."""
    done = {}

    def results(np_):
        if np_ not in done:
            launcher = () if np_ == 1 else None
            done[np_] = run_job("weak_job.py", np=np_, args=[str(STEPS), "contract", *PARTS[np_]],
                                launcher=launcher, timeout=JOB_TIMEOUT)
        return done[np_].check()

    return results


def case(job, name):
    found = [r for r in job.results() if r["case"] == name]
    assert found, f"no RESULT for {name}:\n{job.output[-6000:]}"
    return found


@pytest.mark.parametrize("np_", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_ends_in_one_consensus_model(weak_job, strategy, np_):
    (out,) = case(weak_job(np_), f"contract:{strategy}")
    assert out["start_identical"], "start() must leave every rank with rank 0's parameters"
    assert out["state"] == {"step": STEPS, "last_sync_step": STEPS}, out
    assert out["final_state"] == {"step": STEPS, "last_sync_step": STEPS}, out
    assert out["identical"], "after finish() every rank must hold bit-identical parameters"
    # targets are 4 apart per rank: without sharing the ranks would end spread/2 from each other
    assert out["disagreement"] <= 0.05 * out["spread"], out
    # it converges near the mean of the targets (a loose bound: it cannot see a lost push)
    assert out["error"] <= 0.2 * out["spread"] + 0.01, out


@pytest.mark.parametrize("np_", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_ranks_pushes_reach_the_final_model(weak_job, strategy, np_):
    """The final model is rank 0's start plus exactly what every rank gave by the strategy's
    rule (tests/scripts/weak_contract.py), to rounding: far below any one rank's share."""
    (out,) = case(weak_job(np_), f"contract:{strategy}")
    tolerance = 1e-9 * (1.0 + out["scale"])
    assert out["smallest_contribution"] > 1e6 * tolerance, out  # dropping any rank's share shows
    assert out["accounting_error"] <= tolerance, out


@pytest.mark.parametrize("np_", [1, 2])
def test_runner_misuse_is_refused(weak_job, np_):
    found = case(weak_job(np_), "lifecycle")
    assert sorted(out["rank"] for out in found) == list(range(np_))
    for out in found:
        expected = f"{np_}x{np_} for {np_} ranks; got {np_ + 1}x{np_ + 1}"
        assert out["wrong_matrix"] == f"ValueError: Gossip.weights must be {expected}"
        assert out["windows_before"] == 0 and out["windows_after_refusal"] == 0
        assert out["step_before_start"].startswith("UsageError: after_step() was called before start()")
        assert out["finish_before_start"].startswith("UsageError: finish() was called before start()")
        assert out["start_twice"].startswith("UsageError: start() was called on a running Downpour runner")
        assert out["finish_again"] == "ok"
        assert out["step_after_finish"].startswith("UsageError: after_step() was called after finish()")
        assert out["windows_after_finish"] == 0
        for name in ("downpour", "easgd-ssp", "gossip"):
            assert out[f"restarted_{name}"] <= 1e-12, out  # the old centre / published vectors are gone


def test_a_straggler_holds_back_downpour_only_under_a_staleness_bound(weak_job):
    (out,) = case(weak_job(4), "straggler")
    staleness = out["staleness"]
    # free: in the same window of time the fast ranks step far more often than the slow one
    # (held back by it they would make as few steps); a ratio of ranks, not a machine speed
    *fast, slow = out["free_steps"]
    assert slow > 0 and min(fast) >= 3 * slow, out
    # bounded: no rank ever got more than S + 1 steps ahead of the slowest active one
    *fast, slow = out["bounded_steps"]
    assert max(fast) <= slow + staleness + 1, out
    assert out["max_gap"] <= staleness + 1, out
    assert out["identical"], out
