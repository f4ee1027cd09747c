"""The RMA windows in real MPI jobs on 2 and 4 ranks. Three jobs (tests/scripts/window_job.py):
2 ranks, 4 ranks, and 4 ranks with every operation through the relay; each runs its cases in
turn and the tests below read their RESULT lines, case by case."""

import pytest

from hvdagents.data import shard_bounds
from mpirun import run_job

#: Hard limit per job; each takes several seconds.
JOB_TIMEOUT = 240

#: ``HVDAGENTS_WINDOWS=relay``: every operation between ranks through the relay's service
#: threads (on one host; across hosts see test_multihost_mpi.py), not MPI's windows.
RELAY = {"HVDAGENTS_WINDOWS": "relay"}

#: The jobs: ranks, environment, and the cases each runs in order (``sum:3``: with 4 ranks,
#: rank 3's shard is empty).
JOBS = {
    "2": (2, None, ["sum:1001:float64", "sum:1001:float32", "consistency", "clock", "modes"]),
    "4": (4, None, ["sum:1001:float64", "sum:3:float64", "consistency", "clock", "cycles"]),
    "4-relay": (4, RELAY, ["sum:1001:float64", "sum:3:float32", "consistency", "clock"]),
}


@pytest.fixture(scope="module")
def window_job():
    """``window_job(key)``: the finished job ``JOBS[key]``, run once per module."""
    done = {}

    def job(key):
        if key not in done:
            np_, env, parts = JOBS[key]
            done[key] = run_job("window_job.py", np=np_, args=parts, timeout=JOB_TIMEOUT, env=env)
        return done[key].check()

    return job


def per_rank(job, case, np_):
    found = sorted((r for r in job.results() if r.get("case") == case), key=lambda r: r["rank"])
    assert [r["rank"] for r in found] == list(range(np_)), f"{case}:\n{job.output[-6000:]}"
    return found


@pytest.mark.parametrize("key, n, dtype", [
    ("2", 1001, "float64"),
    ("4", 1001, "float64"),
    ("4", 3, "float64"),  # rank 3 holds an empty shard
    ("2", 1001, "float32"),
    ("4-relay", 1001, "float64"),
    ("4-relay", 3, "float32"),
])
def test_concurrent_pushes_are_never_lost(window_job, key, n, dtype):
    np_, env, _ = JOBS[key]
    found = per_rank(window_job(key), f"sum:{n}:{dtype}", np_)
    for r in found:
        assert r["init_equal"], r
        assert r["equal"] and r["max_error"] == 0.0, r
        assert r["dtype"] == dtype
        assert r["groups"] == (np_ if env else 1)  # the relay between every pair of ranks, or none
    assert [tuple(r["shard"]) for r in found] == [shard_bounds(n, rank, np_) for rank in range(np_)]


@pytest.mark.parametrize("key", list(JOBS))
def test_reads_racing_with_writes_see_whole_values(window_job, key):
    found = per_rank(window_job(key), "consistency", JOBS[key][0])
    for r in found:
        # ParameterWindow: every element a valid partial sum, own pushes all visible, nothing goes back
        assert (r["bad_pull"], r["own_wrong"], r["went_back"]) == (0, 0, 0), r
        assert r["final_exact"], r


@pytest.mark.parametrize("key", list(JOBS))
def test_clock_window_bounds_staleness(window_job, key):
    np_ = JOBS[key][0]
    found = per_rank(window_job(key), "clock", np_)
    root, others = found[0], found[1:]
    staleness = root["staleness"]
    assert root["ticks"] == [1, 2, 3]
    assert all(r["seen_after_ticks"] == [3] + [0] * (np_ - 1) for r in found)
    assert root["blocked"], "a rank 3 steps ahead must wait for a bound of 1"
    # the condition already held when the wait began: it returns on its first poll (its own
    # timeout is 30 s; 5 s only guards against a wait that stops polling)
    assert root["released_after_s"] < 5.0
    assert root["retired_seen"]
    assert all(r["tick_after_retire"] == "UsageError" for r in others)
    # with the last rank slowed: a rank that ticked but has not waited yet is at most S + 1 ahead
    assert max(r["bounded_gap"] for r in found) <= staleness + 1, found
    # the same run without waiting does drift apart, so the bound above is what held it
    assert max(r["free_gap"] for r in found) > staleness + 1, found


def test_windows_are_freed(window_job):
    job = window_job("4")
    np_ = JOBS["4"][0]
    found = per_rank(job, "cycles", np_)
    for r in found:
        assert r["live_before"] == 0 and r["live_after_cycles"] == 0, r
        # 180 measured cycles of three windows each: no mapping and under 4 windows' memory kept
        assert r["mapping_growth"] <= 2, r
        assert r["rss_growth_kib"] < 4 * r["window_kib"] * np_, r
        # calibration: 20 windows left open do show in both measures
        assert r["leak_mapping_growth"] >= 20 and r["leak_rss_growth_kib"] > 10 * r["window_kib"], r
        assert r["resource_warning"], r
        assert r["live_at_exit"] == 21
    # the exit hook freed those 21 windows on every rank, and the job ended cleanly
    exits = sorted(job.results("EXIT"), key=lambda r: r["rank"])
    assert exits == [{"rank": rank, "live_at_end": 0} for rank in range(np_)], job.output


@pytest.mark.parametrize("case", ["differ", "bad"])
def test_a_windows_mode_that_is_bad_or_differs_is_refused_on_every_rank(window_job, case):
    for r in per_rank(window_job("2"), f"modes:{case}", 2):
        if case == "differ":
            assert r["error"] == "HVDAGENTS_WINDOWS must be the same on every rank; got rank 0: auto, rank 1: relay"
        else:
            assert r["error"].startswith("HVDAGENTS_WINDOWS must be one of auto, mpi, relay; got 'fastest'"), r
            assert r["error"].endswith("(on rank 0)") == (r["rank"] == 1)
