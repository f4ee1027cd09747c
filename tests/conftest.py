import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
from multihost import SimulatedHosts, unavailable_reason  # noqa: E402


@pytest.fixture(scope="session")
def two_hosts():
    """Two simulated hosts (network namespaces, TCP only), built once for the session."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SimulatedHosts(2) as hosts:
        yield hosts
