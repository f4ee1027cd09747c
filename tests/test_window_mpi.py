"""The RMA windows in real MPI jobs on 2 and 4 ranks (see tests/scripts/window_*.py)."""

import pytest

from hvdagents.data import shard_bounds
from mpirun import run_job

#: Hard limit per job; each takes a few seconds.
JOB_TIMEOUT = 120
PUSHES = 1000


def per_rank(job, np_):
    job.check()
    found = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in found] == list(range(np_)), job.output
    return found


#: ``HVDAGENTS_WINDOWS=relay``: every operation between ranks through the relay's service
#: threads (on one host; across hosts see test_multihost_mpi.py), not MPI's windows.
RELAY = {"HVDAGENTS_WINDOWS": "relay"}


@pytest.mark.parametrize("np_, n, dtype, env", [
    (2, 1001, "float64", None),
    (4, 1001, "float64", None),
    (4, 3, "float64", None),  # rank 3 holds an empty shard
    (2, 1001, "float32", None),
    (4, 1001, "float64", RELAY),
    (4, 3, "float32", RELAY),
])
def test_concurrent_pushes_are_never_lost(np_, n, dtype, env):
    job = run_job("window_sum.py", np=np_, args=[str(n), dtype, str(PUSHES)], timeout=JOB_TIMEOUT, env=env)
    found = per_rank(job, np_)
    for r in found:
        assert r["init_equal"], r
        assert r["equal"] and r["max_error"] == 0.0, r
        assert r["dtype"] == dtype
        assert r["groups"] == (np_ if env else 1)  # the relay between every pair of ranks, or none
    assert [tuple(r["shard"]) for r in found] == [shard_bounds(n, rank, np_) for rank in range(np_)]


@pytest.mark.parametrize("np_, env", [(2, None), (4, None), (4, RELAY)])
def test_reads_racing_with_writes_see_whole_values(np_, env):
    job = run_job("window_consistency.py", np=np_, args=["20000", "300"], timeout=JOB_TIMEOUT, env=env)
    found = per_rank(job, np_)
    for r in found:
        # ParameterWindow: every element a valid partial sum, own pushes all visible, nothing goes back
        assert (r["bad_pull"], r["own_wrong"], r["went_back"]) == (0, 0, 0), r
        assert r["final_exact"], r
        # PeerWindow: every element a whole published version, never older than one read before
        assert (r["peer_bad"], r["peer_back"]) == (0, 0), r
        assert r["peer_final"], r


@pytest.mark.parametrize("np_, env", [(2, None), (4, None), (4, RELAY)])
def test_clock_window_bounds_staleness(np_, env):
    staleness = 2
    job = run_job("window_clock.py", np=np_, args=[str(staleness), "40"], timeout=JOB_TIMEOUT, env=env)
    found = per_rank(job, np_)
    root, others = found[0], found[1:]
    assert root["ticks"] == [1, 2, 3]
    assert all(r["seen_after_ticks"] == [3] + [0] * (np_ - 1) for r in found)
    assert root["blocked"], "a rank 3 steps ahead must wait for a bound of 1"
    assert root["released_after_s"] < 5.0
    assert root["retired_seen"]
    assert all(r["tick_after_retire"] == "UsageError" for r in others)
    # with the last rank slowed: a rank that ticked but has not waited yet is at most S + 1 ahead
    assert max(r["bounded_gap"] for r in found) <= staleness + 1, found
    # the same run without waiting does drift apart, so the bound above is what held it
    assert max(r["free_gap"] for r in found) > staleness + 1, found


@pytest.mark.parametrize("np_", [4])
def test_windows_are_freed(np_):
    job = run_job("window_cycles.py", np=np_, args=["200", str(1 << 17)], timeout=JOB_TIMEOUT)
    found = per_rank(job, np_)
    for r in found:
        assert r["live_after_cycles"] == 0, r
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
def test_a_windows_mode_that_is_bad_or_differs_is_refused_on_every_rank(case):
    found = per_rank(run_job("window_modes.py", np=2, args=[case], timeout=JOB_TIMEOUT), 2)
    for r in found:
        if case == "differ":
            assert r["error"] == "HVDAGENTS_WINDOWS must be the same on every rank; got rank 0: auto, rank 1: relay"
        else:
            assert r["error"].startswith("HVDAGENTS_WINDOWS must be one of auto, mpi, relay; got 'fastest'"), r
            assert r["error"].endswith("(on rank 0)") == (r["rank"] == 1)
