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

A slow network: ``link_rate`` (``"100mbit"``, ``"1gbit"``, ...; :meth:`SimulatedHosts.set_link_rate`
changes it) shapes every host's link to the switch in both directions with a token bucket
(``tc qdisc ... tbf``: each host sends at most that rate and receives at most that rate; traffic
inside a host, over its loopback, is not shaped). :meth:`SimulatedHosts.bytes_sent` reads each
host's link counters, so a test or benchmark can count the bytes that crossed between hosts
(everything a host sent to another, including MPI's own wire-up and TCP headers).

Needs root, ``ip`` (iproute2) and ``unshare`` (and ``tc`` for a link rate);
:func:`unavailable_reason` says what is missing. Everything made is torn down on close, every
process left in a namespace killed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["SimulatedHosts", "unavailable_reason", "SUBNET", "parse_rate"]

SUBNET = "10.99.0.0/24"
_INSTANCES = itertools.count()
#: tc's rate units, in bit/s.
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
#: Queueing delay the token bucket allows before it drops (tc's ``latency``): TCP backs off
#: on the drops, as it would at a real bottleneck.
SHAPER_LATENCY = "50ms"


def parse_rate(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 (bit/s); a ``ValueError`` names anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*", str(rate).lower())
    bits = float(match.group(1)) * RATE_UNITS[match.group(2)] if match else 0
    if not match or not 1000 <= bits <= 100 * 10**9:
        raise ValueError(f"SimulatedHosts link_rate must be a rate such as '100mbit' or '1gbit' "
                         f"(units bit, kbit, mbit, gbit; 1kbit to 100gbit); got {rate!r}")
    return int(bits)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable_reason(shaped: bool = False) -> Optional[str]:
    """Why hosts (with a link rate when ``shaped``) cannot be simulated here, or ``None``."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces)"
    for tool in ("ip", "unshare", *(("tc",) if shaped else ())):
        if shutil.which(tool) is None:
            return f"simulated hosts need '{tool}' (iproute2 / util-linux), not found on PATH"
    return None


class SimulatedHosts:
    """``count`` hosts (node1..nodeN at 10.99.0.1..N) joined by one bridge; a context manager.

    ``link_rate``: ``None`` (unshaped: as fast as the kernel copies) or a tc rate such as
    ``"100mbit"`` for every host's link, both directions."""

    def __init__(self, count: int = 2, link_rate: Optional[str] = None) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 9:
            raise ValueError(f"SimulatedHosts count must be an int in [2, 9]; got {count!r}")
        if link_rate is not None:
            parse_rate(link_rate)
        self.count = count
        self.link_rate: Optional[str] = None
        # unique per instance (two in one process must not share a namespace), and short:
        # a link's name, tag + "a9", must fit Linux's 15 characters
        self.tag = f"hv{os.getpid() % 100000}{next(_INSTANCES):x}"
        self.switch = f"{self.tag}sw"
        self.namespaces = [f"{self.tag}n{i}" for i in range(1, count + 1)]
        #: Per host: (its end of its link, the switch's end), the devices a link rate shapes.
        self.links = [(f"{self.tag}a{i}", f"{self.tag}b{i}") for i in range(1, count + 1)]
        self.names = [f"node{i}" for i in range(1, count + 1)]
        self.addresses = [f"10.99.0.{i}" for i in range(1, count + 1)]
        self._dir = Path(tempfile.mkdtemp(prefix="hvdagents-hosts-"))
        self.agent = self._dir / "rsh-agent"
        try:
            self._build()
            if link_rate is not None:
                self.set_link_rate(link_rate)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for ns, address, (host_end, switch_end) in zip(self.namespaces, self.addresses, self.links):
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

    def set_link_rate(self, rate: Optional[str]) -> None:
        """Shape every host's link to ``rate`` in both directions (``None``: unshaped again).

        A token bucket on each end of each link: the host's end limits what the host sends,
        the switch's end what it receives. The bucket holds 10 ms of traffic (at least 64 KiB,
        more than one burst of the kernel's timer) so that the mean rate is ``rate``."""
        bits = None if rate is None else parse_rate(rate)
        for ns, ends in zip(self.namespaces, self.links):
            for where, dev in zip((ns, self.switch), ends):
                tc = ["tc", "-n", where, "qdisc"]
                if bits is None:
                    subprocess.run([*tc, "del", "dev", dev, "root"], capture_output=True, timeout=30)
                    continue
                burst = max(64 * 1024, bits // 8 // 100)
                subprocess.run([*tc, "replace", "dev", dev, "root", "tbf", "rate", f"{bits}bit",
                                "burst", str(burst), "latency", SHAPER_LATENCY],
                               check=True, capture_output=True, text=True, timeout=30)
        self.link_rate = rate

    def bytes_sent(self) -> list[int]:
        """Bytes each host has sent on its link since the hosts were made (its end's transmit
        counter): what left the host for the others, headers included."""
        sent = []
        for ns, (host_end, _) in zip(self.namespaces, self.links):
            out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", host_end],
                                 check=True, capture_output=True, text=True, timeout=30).stdout
            sent.append(int(json.loads(out)[0]["stats64"]["tx"]["bytes"]))
        return sent

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
