"""The asynchronous strategies in real MPI jobs (see tests/scripts/weak_*.py), on a real tiny
NumPy model that pulls every rank towards its own target."""

import pytest

from mpirun import run_job

#: Hard limit per job; each takes a few seconds.
JOB_TIMEOUT = 120
STEPS = 300
STRATEGIES = ["downpour", "downpour-ssp", "easgd", "gossip", "gossip-ring"]


def job_on(script, np_, args):
    """World of one as plain ``python script`` (no launcher), larger worlds under mpirun."""
    launcher = () if np_ == 1 else None
    return run_job(script, np=np_, args=args, launcher=launcher, timeout=JOB_TIMEOUT).check()


@pytest.mark.parametrize("np_", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_ends_in_one_consensus_model(strategy, np_):
    (out,) = job_on("weak_contract.py", np_, [strategy, str(STEPS)]).results()
    assert out["start_identical"], "start() must leave every rank with rank 0's parameters"
    assert out["state"] == {"step": STEPS, "last_sync_step": STEPS}, out
    assert out["final_state"] == {"step": STEPS, "last_sync_step": STEPS}, out
    assert out["identical"], "after finish() every rank must hold bit-identical parameters"
    # targets are 4 apart per rank: without sharing the ranks would end spread/2 from each other
    assert out["disagreement"] <= 0.05 * out["spread"], out
    assert out["error"] <= 0.2 * out["spread"] + 0.01, out


@pytest.mark.parametrize("np_", [1, 2])
def test_runner_misuse_is_refused(np_):
    found = job_on("weak_lifecycle.py", np_, []).results()
    assert len(found) == np_
    for out in found:
        expected = f"{np_}x{np_} for {np_} ranks; got {np_ + 1}x{np_ + 1}"
        assert out["wrong_matrix"] == f"ValueError: Gossip.weights must be {expected}"
        assert out["windows_after_refusal"] == 0
        assert out["step_before_start"].startswith("UsageError: after_step() was called before start()")
        assert out["finish_before_start"].startswith("UsageError: finish() was called before start()")
        assert out["start_twice"].startswith("UsageError: start() was called on a running Downpour runner")
        assert out["finish_again"] == "ok"
        assert out["step_after_finish"].startswith("UsageError: after_step() was called after finish()")
        assert out["windows_after_finish"] == 0
        for name in ("downpour", "easgd-ssp", "gossip"):
            assert out[f"reseed_{name}"] <= 1e-12, out  # the old centre / published vectors are gone


def test_a_straggler_holds_back_downpour_only_under_a_staleness_bound():
    staleness = 2
    (out,) = job_on("weak_straggler.py", 4, ["2.0", "1.0", str(staleness)]).results()
    *fast, slow = out["free_steps"]
    assert slow > 0 and min(fast) >= 3 * slow, out
    *fast, slow = out["bounded_steps"]
    assert max(fast) <= slow + staleness + 1, out
    assert out["max_gap"] <= staleness + 1, out
    assert out["identical"], out
