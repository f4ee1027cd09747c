import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from multihost import SimulatedHosts, unavailable_reason  # noqa: E402

from slurm_cluster import SlurmCluster, SlurmUnavailable, install_slurm  # noqa: E402


@pytest.fixture(autouse=True)
def _environment_restored():
    """What a test, or the library inside it, changes in this process's environment is undone
    after it (``hva.init()`` in a unit test applies hvdagents' Horovod settings to
    ``os.environ``): otherwise it leaks into every job later tests start (a cycle time set
    in-process was once read as the user's by tests/test_horovod_settings.py)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def two_hosts():
    """Two simulated hosts (network namespaces, TCP only), built once for the session."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SimulatedHosts(2) as hosts:
        yield hosts


def _running_slurm(hosts=None):
    """A running SLURM (one node, or one per simulated host); skipped with the reason where it
    cannot be installed, failed with its logs where it does not come up; stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("the test SLURM runs slurmctld/slurmd as root (SlurmUser=root) and makes "
                    "stand-in GPU device nodes: run the SLURM tests as root")
    try:
        installed, why = install_slurm()
    except SlurmUnavailable as exc:
        pytest.fail(f"installing SLURM failed: {exc}")
    if not installed:
        pytest.skip(f"SLURM is not installed and cannot be installed here: {why}")
    root = Path(tempfile.mkdtemp(prefix="hva-slurm-"))
    cluster = SlurmCluster(root, hosts=hosts)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.fail(f"SLURM did not come up (files kept in {root}): {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm():
    """A running one-node SLURM for the whole session."""
    yield from _running_slurm()


@pytest.fixture(scope="module")
def two_node_slurm(two_hosts):
    """SLURM with one slurmd on each of the two simulated hosts (the controller on node1)."""
    yield from _running_slurm(two_hosts)
