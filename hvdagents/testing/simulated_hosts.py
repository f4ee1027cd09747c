"""Simulated hosts on one machine: network namespaces joined by a bridge, TCP only.

:class:`SimulatedHosts` makes ``count`` hosts. Each is a network namespace with its own
loopback and one address 10.99.0.<i> on a veth whose other end sits on a bridge in a "switch"
namespace; each runs its processes under ``unshare --uts`` with its own hostname (node1,
node2, ...). Two ranks on different hosts share no network stack and no hostname, so MPI
treats them as different nodes and talks TCP between them; ranks on one host are a node.

Jobs start on host 1 (``mpirun`` there); Open MPI reaches the other hosts through an rsh agent
script that enters the host's namespace, as ``ssh`` would enter a real node. The MCA settings
for that travel as ``OMPI_MCA_*`` variables (:attr:`SimulatedHosts.env`), so the project's own
launcher (``python -m hvdagents launch --hosts ...``) runs unchanged. Used by the project's
multi-host tests (``tests/multihost.py``) and benchmarks (``bench/crosshost.py``).

Needs root, ``ip`` (iproute2) and ``unshare``; :func:`unavailable_reason` says what is
missing. Everything made is torn down on close, every process left in a namespace killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["SimulatedHosts", "unavailable_reason", "SUBNET"]

SUBNET = "10.99.0.0/24"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable_reason() -> Optional[str]:
    """Why hosts cannot be simulated here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"simulated hosts need '{tool}' (iproute2 / util-linux), not found on PATH"
    return None


class SimulatedHosts:
    """``count`` hosts (node1..nodeN at 10.99.0.1..N) joined by one bridge; a context manager."""

    def __init__(self, count: int = 2) -> None:
        if not 2 <= count <= 9:
            raise ValueError(f"SimulatedHosts count must be in [2, 9]; got {count}")
        self.count = count
        self.tag = f"hv{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.namespaces = [f"{self.tag}n{i}" for i in range(1, count + 1)]
        self.names = [f"node{i}" for i in range(1, count + 1)]
        self.addresses = [f"10.99.0.{i}" for i in range(1, count + 1)]
        self._dir = Path(tempfile.mkdtemp(prefix="hvdagents-hosts-"))
        self.agent = self._dir / "rsh-agent"
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses), start=1):
            host_end, switch_end = f"{self.tag}a{i}", f"{self.tag}b{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
            _ip("link", "set", host_end, "netns", ns)
            _ip("link", "set", switch_end, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
            _ip("-n", self.switch, "link", "set", switch_end, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", host_end)
            _ip("-n", ns, "link", "set", host_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        cases = "\n".join(f"  {a}|{n}) ns={ns}; name={n};;"
                          for a, n, ns in zip(self.addresses, self.names, self.namespaces))
        self.agent.write_text(
            "#!/bin/sh\n# rsh agent: run a command on a simulated host (enter its namespace)\n"
            f'host=$1; shift\ncase "$host" in\n{cases}\n'
            '  *) echo "rsh-agent: unknown host $host" >&2; exit 1;;\nesac\n'
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; $*"\n'
        )
        self.agent.chmod(0o755)

    @property
    def env(self) -> dict[str, str]:
        """Open MPI settings for jobs across these hosts: the rsh agent, TCP on the subnet."""
        return {
            "OMPI_MCA_plm_rsh_agent": str(self.agent),
            "OMPI_MCA_btl_tcp_if_include": SUBNET,
            "OMPI_MCA_oob_tcp_if_include": SUBNET,
        }

    def hosts_arg(self, slots: int) -> str:
        """``10.99.0.1:slots,10.99.0.2:slots,...`` for ``-H`` / ``--hosts``."""
        return ",".join(f"{a}:{slots}" for a in self.addresses)

    def enter(self, host: int = 0) -> list[str]:
        """Command prefix that runs a command on host ``host`` (0-based)."""
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts",
                "sh", "-c", 'hostname "$0"; exec "$@"', self.names[host]]

    def kill_all(self) -> None:
        """Kill every process running in the hosts (remote ranks are not in mpirun's group)."""
        for ns in self.namespaces:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in out.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def close(self) -> None:
        """Kill what still runs on the hosts, delete the namespaces (and their links)."""
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        if any(ns in existing for ns in self.namespaces):
            self.kill_all()
        for ns in [*self.namespaces, self.switch]:
            if ns in existing:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SimulatedHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SimulatedHosts({', '.join(f'{n}={a}' for n, a in zip(self.names, self.addresses))})"
