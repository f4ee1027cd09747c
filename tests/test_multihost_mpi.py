"""Jobs across two simulated hosts (network namespaces, TCP only; see tests/multihost.py).

Skipped, with the reason, where hosts cannot be simulated (not root, no iproute2)."""

import re
import sys

import pytest

from mpirun import REPO, SCRIPTS, Checks

SLOTS = 2  # ranks per host


def results(job):
    job.check()
    return sorted(job.results(), key=lambda r: r["rank"])


def test_each_host_is_a_node_with_its_own_local_ranks(two_hosts):
    job = two_hosts.run(two_hosts.mpirun(SCRIPTS / "report_context.py", SLOTS, ["--horovod"]), timeout=180)
    found = results(job)
    assert [c["rank"] for c in found] == list(range(2 * SLOTS))
    for c in found:
        assert c["size"] == 2 * SLOTS and c["local_size"] == SLOTS and c["local_rank"] == c["rank"] % SLOTS
        assert c["hvd_torch"] == [c["rank"], 2 * SLOTS, c["local_rank"]]  # Horovod agrees
        assert c["hvd_tensorflow"] == [c["rank"], 2 * SLOTS, c["local_rank"]]


def test_the_projects_launcher_runs_across_hosts(two_hosts):
    command = [sys.executable, "-m", "hvdagents", "launch", "-np", str(2 * SLOTS),
               "--hosts", two_hosts.hosts_arg(SLOTS), str(SCRIPTS / "report_context.py")]
    found = results(two_hosts.run(command, timeout=180))
    assert [(c["rank"], c["local_rank"], c["local_size"]) for c in found] == [
        (r, r % SLOTS, SLOTS) for r in range(2 * SLOTS)]


@pytest.mark.parametrize("script", ["torch_sync.py", "keras_sync.py"])
def test_sync_across_hosts_equals_one_process(two_hosts, script):
    job = two_hosts.run(two_hosts.mpirun(SCRIPTS / script, 1), timeout=300).check()
    checks = {r["check"]: r for r in job.results()}
    assert checks["equivalence"]["moved"] > 1e-3
    assert checks["equivalence"]["max_rel"] < (1e-10 if script.startswith("torch") else 1e-5)
    assert checks["identical"]["identical"] is True and checks["identical"]["ranks"] == 2


def _store_results(two_hosts, env=None):
    return results(two_hosts.run(two_hosts.mpirun(SCRIPTS / "store_across_hosts.py", SLOTS, ["store"]),
                                 timeout=300, env=env))


def _open_mpi_major():
    from mpi4py import MPI

    found = re.search(r"Open MPI v(\d+)\.", MPI.Get_library_version())
    return int(found.group(1)) if found else None


def _windows_across_hosts_refused():
    """Whether this MPI refuses windows across the hosts: Debian's Open MPI 4.1 over TCP does,
    Open MPI 5 does not. Another MPI: what to expect is not known, and the test that asks is
    skipped with that reason instead of taking either branch unnoticed."""
    from mpi4py import MPI

    major = _open_mpi_major()
    if major is None:
        pytest.skip(f"not Open MPI ({MPI.Get_library_version().splitlines()[0]!r}): the expected "
                    "cross-host verdict is known for Open MPI 4 and 5 only")
    return major == 4


def test_the_store_across_hosts_loses_no_update(two_hosts):
    # the default layout: MPI windows inside each host, the relay between the hosts
    found = _store_results(two_hosts)
    assert {c["host"] for c in found} == {"node1", "node2"}
    for c in found:
        assert not c["refused"], c
        assert c["small"] == [2500.0 * 2 * SLOTS] and c["large"] == [3.0 * 2 * SLOTS]
        assert c["through_relay"] is True


def test_a_push_and_pull_to_a_busy_rank_on_another_host_do_not_wait_for_it(two_hosts):
    # rank 1 (node2) computes for 4 s without calling MPI, first NumPy (releases the GIL), then
    # pure Python (holds it); rank 0 (node1) pushes 4 MB to its memory and reads it back, 3 times
    # each. What is guaranteed: the relay does not wait for the target's computation (4 s). Bar:
    # the median of the 3 <= max(100 ms, 10 x a two-sided 4 MB ping-pong in the same job), 40
    # times below the computation; every push arrived, exactly. How fast it is goes to the bench
    # (`python -m bench --only crosshost`: 20-30 ms idle; beside other MPI jobs one run in 20 had
    # a 58 ms median against the former 50 ms bar).
    worker = REPO / "bench" / "workers" / "cross_node_store.py"
    job = two_hosts.run(two_hosts.mpirun(worker, 1, ["--busy-s", "4", "--reps", "3", "--mib", "4"]),
                        timeout=180, env={"PYTHONPATH": str(REPO)}).check()
    (found,) = job.results(tag="BENCH")
    assert found["through_relay"] is True and found["exact"] is True
    bar = max(0.100, 10 * found["pingpong_4mb_s"])
    for kind, seconds in found["busy_push_pull_s"].items():
        assert len(seconds) == 3 and sorted(seconds)[1] <= bar, (kind, seconds, found["pingpong_4mb_s"])


def test_mpi_windows_across_hosts_are_exact_or_refused_on_every_rank(two_hosts):
    found = _store_results(two_hosts, env={"HVDAGENTS_WINDOWS": "mpi"})
    if all(c["refused"] for c in found):
        # Debian's Open MPI 4.1 over TCP cannot create windows across nodes: refused, with fixes
        assert _windows_across_hosts_refused(), found
        for c in found:
            assert "MPI cannot create a one-sided window across nodes" in c["message"]
            assert "HVDAGENTS_WINDOWS at auto" in c["message"] and "Sync" in c["message"]
    else:
        assert not any(c["refused"] for c in found), found  # never some ranks only
        for c in found:
            assert c["small"] == [2500.0 * 2 * SLOTS] and c["large"] == [3.0 * 2 * SLOTS]


@pytest.mark.skipif(_open_mpi_major() != 4, reason="the lossy transport is Open MPI 4's osc/ucx")
def test_a_lossy_transport_is_refused_before_any_push(two_hosts):
    # osc/ucx over UCX's TCP transport creates windows here that lost 2511 updates in 1200 pushes;
    # it is refused even where it would only serve the windows inside each host
    found = _store_results(two_hosts, env={"OMPI_MCA_osc": "ucx", "UCX_TLS": "tcp,self"})
    assert all(c["refused"] for c in found)
    assert all("osc/ucx over UCX_TLS=tcp,self loses concurrent accumulates" in c["message"] for c in found)


def test_an_async_agent_that_cannot_work_across_hosts_ends_the_job_with_the_reason(two_hosts):
    job = two_hosts.run(two_hosts.mpirun(SCRIPTS / "store_across_hosts.py", SLOTS, ["agent"]), timeout=120,
                        env={"HVDAGENTS_WINDOWS": "mpi"})
    if _open_mpi_major() == 4:
        # ends with the reason, not at the timeout (start-up on this machine is not timed)
        assert job.returncode != 0 and not job.timed_out
        assert "OneSidedUnavailableError" in job.output and not job.results()
    else:
        assert [r["agent"] for r in results(job)] == ["started"] * 2 * SLOTS


def test_doctor_probes_one_sided_operations_across_hosts(two_hosts):
    job = two_hosts.run(two_hosts.mpirun("-m", SLOTS, ["hvdagents", "doctor"]), timeout=180)
    assert "4 ranks on 2 node(s)" in job.stdout, job.output
    (line,) = [ln for ln in job.stdout.splitlines() if ln.startswith("[") and "one-sided windows" in ln]
    verdict = job.stdout.strip().splitlines()[-1]
    assert line.startswith("[  ok]") and "MPI windows inside each node" in line, line
    assert "relay between 2 nodes" in line and "none lost" in line, line
    assert verdict == "verdict: ready", verdict


def test_doctor_reports_mpi_windows_across_hosts(two_hosts):
    job = two_hosts.run(two_hosts.mpirun("-m", SLOTS, ["hvdagents", "doctor"]), timeout=180,
                        env={"HVDAGENTS_WINDOWS": "mpi"})
    (line,) = [ln for ln in job.stdout.splitlines() if ln.startswith("[") and "one-sided windows" in ln]
    verdict = job.stdout.strip().splitlines()[-1]
    if _windows_across_hosts_refused():
        assert line.startswith("[warn]") and "cannot create a one-sided window across nodes" in line
        assert "synchronous strategies only" in verdict, verdict
    else:  # windows across the hosts work: nothing to warn about
        assert line.startswith("[  ok]") and "none lost" in line, line
        assert verdict == "verdict: ready", verdict


# Every asynchronous strategy across the hosts (2 x 2 ranks, the relay between them), the
# examples' defaults: one consensus model after close() that reaches the one-host bar of
# test_async_agents_mpi.py (0.93; here 0.96-0.97 after 20 epochs). One job, one strategy after
# another (a fresh agent each): one start-up across the hosts instead of one per strategy.
ASYNC_STRATEGIES = ["downpour", "easgd", "gossip", "asyncdiloco"]
ASYNC_EPOCHS = 20


@pytest.fixture(scope="module")
def async_across_hosts(two_hosts):
    job = two_hosts.run(two_hosts.mpirun(SCRIPTS / "async_across_hosts.py", SLOTS,
                                         [str(ASYNC_EPOCHS), ",".join(ASYNC_STRATEGIES)]), timeout=300)
    return Checks(job)


def test_the_async_job_across_hosts_runs_every_strategy_to_the_end(async_across_hosts):
    async_across_hosts.job.check()


@pytest.mark.parametrize("strategy", ASYNC_STRATEGIES)
def test_async_strategies_reach_one_consensus_across_hosts(async_across_hosts, strategy):
    found = async_across_hosts[strategy]
    assert found["shown"] == pytest.approx(found["accuracy"], abs=1e-4), found  # what the example printed
    assert found["accuracy"] >= 0.93, found
    assert len(found["steps"]) == 2 * SLOTS and all(s > 0 for s in found["steps"]), found


# One rank per host; the rank on node2 does every step's forward and backward three times
# (compute, not sleep), each rank on its own clock for 4 s (the script has no collective of its
# own). What is asserted compares the two ranks inside that phase, never two phases nor the
# machine's pace. The asynchronous fast rank's steps also wait for the slowed host's relay, more
# so on a loaded machine: with x2 compute, beside other MPI jobs, Downpour made 25 vs 19 steps;
# with x3, beside other jobs, the straggler made 0.43-0.54 of the fast rank's steps.
STRAGGLER_STRATEGIES = ["sync", "downpour", "easgd", "gossip"]


@pytest.fixture(scope="module")
def slowed_rank_steps(two_hosts):
    """One job, one strategy after another (a fresh agent each)."""
    job = two_hosts.run(two_hosts.mpirun(SCRIPTS / "straggler_compute.py", 1, [",".join(STRAGGLER_STRATEGIES), "4"]),
                        timeout=240)
    return {r["strategy"]: r for r in job.check().results()}


@pytest.mark.parametrize("strategy", STRAGGLER_STRATEGIES)
def test_a_rank_slowed_by_compute_on_another_host_does_not_slow_the_others(slowed_rank_steps, strategy):
    found = slowed_rank_steps[strategy]
    fast, slow = found["straggler"]
    assert found["identical"] and found["finite"]  # one consensus model after close()
    if strategy == "sync":
        # held back: the fast rank makes the slowed rank's steps (lock step from the library's
        # all-reduces), up to the last step or two as each stops on its own clock
        assert abs(fast - slow) <= max(3, 0.1 * slow), found
    else:
        # not held back: the fast rank makes clearly more steps than the straggler in the same
        # 4 s (held back, as Sync, they would make the same count)
        assert slow <= 0.8 * fast, found
