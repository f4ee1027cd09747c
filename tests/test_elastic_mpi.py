"""hva.elastic under a real 'horovodrun --gloo --min-np --max-np --host-discovery-script' launch on
this machine, with failure injection (tests/scripts/elastic_digits.py), for TorchAgent and for
KerasAgent (its custom loop: agent.train_on_batch).

The "hosts" are names of this machine (localhost, 127.0.0.1, its host name or an address of one
of its interfaces): Horovod's driver blacklists the host of a worker that failed, so each
worker needs a host of its own for the job to survive losing one. The discovery script prints a
file that the job's rank 0 rewrites to add slots (at a step chosen in advance, so the test does
not race the training)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_runtime_mpi import HOROVODRUN, horovodrun_results

from mpirun import SCRIPTS, job_env, run_command

#: Each elastic job's hard limit, in seconds.
JOB_TIMEOUT = 150

#: How long Horovod's driver waits for enough workers before it ends a job (--elastic-timeout).
ELASTIC_TIMEOUT_S = 5

#: The accuracy an uninterrupted run must reach on digits, and how far below it a run that lost
#: and regained a worker may end.
ACCURACY_FLOOR = 0.9
ACCURACY_MARGIN = 0.03

#: The failure injected: rank 1 kills itself before step 7 of epoch 1 (commits every 5 steps:
#: the survivors make steps 5 and 6 again); rank 0 adds slots before step 3 of epoch 2.
KILL = (1, 7, 1)
COMMIT_EVERY = 5
GROW_AT = (2, 3)


def local_host_names() -> list[str]:
    """Names that resolve to an address of this machine's interfaces (Horovod starts a worker
    without ssh on such a host), distinct as strings (Horovod's driver tells hosts apart so)."""
    from horovod.runner.util.network import get_local_host_addresses

    local = get_local_host_addresses()
    names = []
    for name in ["localhost", "127.0.0.1", socket.gethostname(), *sorted(local)]:
        try:
            if socket.gethostbyname(name) in local and name not in names:
                names.append(name)
        except OSError:
            continue
    return names


def elastic_job(tmp_path, hosts, np_, min_np, max_np, *script_args, timeout=JOB_TIMEOUT):
    """Run elastic_digits.py under horovodrun's elastic launch; the hosts file and the marks
    directory live in ``tmp_path``."""
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("".join(f"{h}\n" for h in hosts))
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
    discover.chmod(0o755)
    (tmp_path / "marks").mkdir()
    command = [HOROVODRUN, "--gloo", "-np", str(np_), "--min-np", str(min_np), "--max-np", str(max_np),
               "--host-discovery-script", str(discover), "--network-interface", "lo",
               "--elastic-timeout", str(ELASTIC_TIMEOUT_S),
               sys.executable, str(SCRIPTS / "elastic_digits.py"),
               "--hosts-file", str(hosts_file), "--marks", str(tmp_path / "marks"), *script_args]
    return run_command(command, timeout=timeout)


@pytest.fixture(scope="module")
def names():
    found = local_host_names()
    if len(found) < 3:
        pytest.skip(f"needs 3 names of this machine for 3 simulated hosts; found {found}")
    return found[:3]


#: Epochs per framework: Keras' digits MLP meets the accuracy floor in fewer.
EPOCHS = {"torch": 8, "keras": 6}


@pytest.fixture(scope="module", params=["torch", "keras"])
def framework(request):
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(names, framework, tmp_path_factory):
    """3 workers, nothing lost; then the cost of commit() every 5 steps, in the same job."""
    job = elastic_job(tmp_path_factory.mktemp(f"uninterrupted-{framework}"), [f"{n}:1" for n in names], 3, 2, 3,
                      "--framework", framework, "--epochs", str(EPOCHS[framework]),
                      "--commit-every", str(COMMIT_EVERY), "--measure", str(COMMIT_EVERY))
    return job, horovodrun_results(job)


@pytest.fixture(scope="module")
def interrupted(names, framework, tmp_path_factory):
    """3 workers; one killed mid-epoch; the 2 others roll back and continue; slots are added
    (every host 2, --max-np 3): a new worker joins and the world is 3 again."""
    grow = ",".join(f"{n}:2" for n in names)
    job = elastic_job(tmp_path_factory.mktemp(f"interrupted-{framework}"), [f"{n}:1" for n in names], 3, 2, 3,
                      "--framework", framework, "--epochs", str(EPOCHS[framework]),
                      "--commit-every", str(COMMIT_EVERY), "--kill", ":".join(map(str, KILL)),
                      "--grow", f"{GROW_AT[0]}:{GROW_AT[1]}:{grow}")
    return job, horovodrun_results(job)


def test_uninterrupted_run_learns_and_ends_identical(uninterrupted):
    job, found = uninterrupted
    assert [r["rank"] for r in found] == [0, 1, 2] and all(r["sizes"] == [3] for r in found)
    assert len({r["hash"] for r in found}) == 1
    assert all(r["accuracy"] >= ACCURACY_FLOOR for r in found), [r["accuracy"] for r in found]
    ratio = found[0]["commit_ratio"]
    print(f"\n{found[0]['framework']}: commit() every {COMMIT_EVERY} steps: {ratio:.2f}x the time of steps "
          f"without ({found[0]['step_ms']:.1f} ms per step without, {found[0]['commit_ms']:.1f} ms per commit); "
          f"job {job.seconds:.0f} s")


def test_a_killed_worker_rolls_back_the_survivors_and_a_new_one_joins(uninterrupted, interrupted):
    job, found = interrupted
    # the two survivors and the worker that joined end, in a world of 3 again
    assert [r["rank"] for r in found] == [0, 1, 2] and all(r["size"] == 3 for r in found), job.output[-3000:]
    survivors = [r for r in found if len(r["sizes"]) > 1]
    joined = [r for r in found if r not in survivors]
    assert len(survivors) == 2 and all(r["sizes"][:2] == [3, 2] and r["sizes"][-1] == 3 for r in survivors), found
    assert len(joined) == 1 and joined[0]["sizes"] == [3] and joined[0]["resets"] == 0, found
    # back to the last commit: exactly the steps since it were made again
    assert all(r["redone"] == KILL[1] - COMMIT_EVERY for r in survivors), [r["redone"] for r in survivors]
    # every replica, the new one included, ends bit-identical, every epoch done
    assert len({r["hash"] for r in found}) == 1
    assert all(r["epoch"] == found[0]["epoch"] for r in found)
    best = min(r["accuracy"] for r in uninterrupted[1])
    accuracy = found[0]["accuracy"]
    assert accuracy >= ACCURACY_FLOOR and accuracy >= best - ACCURACY_MARGIN, (accuracy, best)
    recovery = max(r["recovery_s"] for r in survivors)
    print(f"\n{found[0]['framework']}: recovery: {recovery:.1f} s from the kill to the survivors' first step "
          f"after it; accuracy {accuracy:.3f} (uninterrupted {best:.3f}); job {job.seconds:.0f} s vs "
          f"{uninterrupted[0].seconds:.0f} s; {survivors[0]['redone']} steps made again")


def test_below_min_np_the_job_ends_with_a_clear_message(names, tmp_path):
    started = time.monotonic()
    job = elastic_job(tmp_path, [f"{n}:1" for n in names[:2]], 2, 2, 2, "--kill", "0:3:1", timeout=90)
    assert not job.timed_out, job.output[-3000:]
    assert job.returncode != 0
    assert "Timed out waiting for" in job.output and "at least 2 Horovod processes" in job.output, job.output[-3000:]
    assert time.monotonic() - started < 90


#: The interface name every simulated host's link gets for this test: horovodrun tells every
#: worker one interface (HOROVOD_GLOO_IFACE, from --network-interface), so every host needs it
#: under the same name, as eth0 on real nodes.
COMMON_INTERFACE = "eth0"

#: Across hosts: the worker on node2 is killed before step 7 of epoch 1 and its host leaves the
#: discovery script's output with it; rank 0 lists node2 again before step 3 of epoch 2. (By host,
#: not by rank: Horovod's elastic driver does not always give node1's worker rank 0.)
HOSTS_KILL = (1, 7, "node2")
HOSTS_BACK_AT = (2, 3)


@pytest.fixture
def elastic_hosts():
    """Two simulated hosts of this test's own (their links renamed to COMMON_INTERFACE, which
    the session's shared hosts must not be)."""
    from multihost import SimulatedHosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SimulatedHosts(2) as hosts:
        # Gloo looks its own host name up: every host resolves node1, node2 (ip netns exec
        # mounts /etc/netns/<namespace>/hosts over /etc/hosts, as DNS would on real nodes)
        names = "".join(f"{a} {n}\n" for a, n in zip(hosts.addresses, hosts.names))
        made = [Path("/etc/netns") / ns for ns in hosts.namespaces]
        try:
            for ns, (host_end, _), where in zip(hosts.namespaces, hosts.links, made):
                link = ["ip", "-n", ns, "link", "set", "dev"]
                for args in ([host_end, "down"], [host_end, "name", COMMON_INTERFACE], [COMMON_INTERFACE, "up"]):
                    subprocess.run([*link, *args], check=True, capture_output=True, timeout=30)
                where.mkdir(parents=True)
                (where / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            hosts.links = [(COMMON_INTERFACE, switch_end) for _, switch_end in hosts.links]
            yield hosts
        finally:
            for where in made:
                shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_across_simulated_hosts_a_lost_host_comes_back(elastic_hosts, tmp_path, framework):
    """horovodrun runs on node1 and starts node2's worker through 'ssh', here a script on PATH
    that enters node2's network namespace (what ssh does on a real node): launcher plumbing,
    Horovod's driver, rendezvous and Gloo run unchanged over TCP between the hosts."""
    hosts = elastic_hosts
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(  # ssh [-o opt]... host [-p port] [-i file] command: the command on the host
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -o|-p|-i) shift 2;; -*) shift;; *) break;; esac; done\n"
        f'host=$1; shift\nwhile [ $# -gt 0 ]; do case "$1" in -o|-p|-i) shift 2;; *) break;; esac; done\n'
        f'exec {hosts.agent} "$host" "$@"\n')
    ssh.chmod(0o755)
    node1, node2 = hosts.addresses
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text(f"{node1}:1\n{node2}:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
    discover.chmod(0o755)
    (tmp_path / "marks").mkdir()
    command = [HOROVODRUN, "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", str(discover), "--network-interface", COMMON_INTERFACE,
               "--elastic-timeout", str(ELASTIC_TIMEOUT_S), "--blacklist-cooldown-range", "1", "2",
               sys.executable, str(SCRIPTS / "elastic_digits.py"), "--framework", framework, "--epochs", "4",
               "--hosts-file", str(hosts_file), "--marks", str(tmp_path / "marks"),
               "--commit-every", str(COMMIT_EVERY), "--kill", ":".join(map(str, HOSTS_KILL)),
               "--lose-hosts", f"{node1}:1", "--grow", f"{HOSTS_BACK_AT[0]}:{HOSTS_BACK_AT[1]}:{node1}:1,{node2}:1"]
    path = f"{bin_dir}{os.pathsep}{job_env()['PATH']}"
    job = hosts.run(command, timeout=JOB_TIMEOUT, env={"PATH": path})
    found = horovodrun_results(job)
    # node1's worker survived; node2's was killed and a new one started there when it came back
    # (Horovod may give rank 0 to either after the reset: they are told apart by host)
    assert sorted((r["rank"], r["size"]) for r in found) == [(0, 2), (1, 2)], found
    by_host = {r["host"]: r for r in found}
    assert sorted(by_host) == ["node1", "node2"], found
    survivor, joined = by_host["node1"], by_host["node2"]
    assert survivor["sizes"][:2] == [2, 1] and survivor["sizes"][-1] == 2, survivor
    assert joined["sizes"] == [2] and joined["resets"] == 0, joined
    assert survivor["redone"] == HOSTS_KILL[1] - COMMIT_EVERY
    assert survivor["hash"] == joined["hash"] and survivor["epoch"] == joined["epoch"] == 4
    assert survivor["accuracy"] >= ACCURACY_FLOOR
    print(f"\nacross hosts ({framework}): recovery {survivor['recovery_s']:.1f} s, job {job.seconds:.0f} s, "
          f"accuracy {survivor['accuracy']:.3f}")
