"""The simulated hosts' slow network (``link_rate``) and byte counters, without MPI: a TCP
transfer between two hosts cannot beat the shaped rate, and the counters see its bytes.

Only lower bounds on time are asserted (shaping guarantees them; a busy machine only makes a
transfer slower), never how fast this machine is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hvdagents.testing import SimulatedHosts, unavailable_reason
from hvdagents.testing.simulated_hosts import parse_rate

PAYLOAD = 4 * 2**20  # bytes sent from host 1 to host 2
PORT = 29517

RECEIVER = f"""
import socket
server = socket.create_server(("10.99.0.2", {PORT}))
print("LISTENING", flush=True)
conn, _ = server.accept()
total = 0
while chunk := conn.recv(1 << 16):
    total += len(chunk)
conn.sendall(str(total).encode())
conn.close()
"""

SENDER = f"""
import socket, time
sock = socket.create_connection(("10.99.0.2", {PORT}), timeout=60)
start = time.perf_counter()
sock.sendall(bytes({PAYLOAD}))
sock.shutdown(socket.SHUT_WR)
received = int(sock.recv(64))
print(received, time.perf_counter() - start)
"""


def _transfer(hosts: SimulatedHosts) -> tuple[int, float]:
    """Send PAYLOAD bytes from host 1 to host 2: (bytes the receiver counted, seconds from the
    first byte sent to the receiver's answer)."""
    receiver = subprocess.Popen([*hosts.enter(1), sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE,
                                text=True)
    try:
        assert receiver.stdout.readline().strip() == "LISTENING"
        out = subprocess.run([*hosts.enter(0), sys.executable, "-c", SENDER], capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
        receiver.wait(30)
    finally:
        receiver.kill()
    return int(out[0]), float(out[1])


def _qdiscs(hosts: SimulatedHosts) -> list[str]:
    """``tc qdisc show`` of both ends of every link."""
    shown = []
    for ns, ends in zip(hosts.namespaces, hosts.links):
        for where, dev in zip((ns, hosts.switch), ends):
            shown.append(subprocess.run(["tc", "-n", where, "qdisc", "show", "dev", dev], capture_output=True,
                                        text=True, timeout=30, check=True).stdout)
    return shown


@pytest.mark.parametrize("rate, bits", [("100mbit", 10**8), ("1gbit", 10**9), ("2.5Gbit", 25 * 10**8),
                                        (" 500kbit ", 5 * 10**5)])
def test_rates_are_parsed_as_tc_writes_them(rate, bits):
    assert parse_rate(rate) == bits


@pytest.mark.parametrize("rate", ["fast", "100", "100mbps", "-1mbit", "0bit", "1000gbit", None])
def test_a_bad_link_rate_is_refused_naming_it_before_anything_is_made(rate):
    with pytest.raises(ValueError, match="link_rate must be a rate such as '100mbit'"):
        parse_rate(rate)
    if rate is not None:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        with pytest.raises(ValueError, match=f"got {rate!r}"):
            SimulatedHosts(2, link_rate=rate)
        assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == listed


@pytest.mark.skipif(unavailable_reason(shaped=True) is not None, reason=str(unavailable_reason(shaped=True)))
def test_a_shaped_link_is_no_faster_than_its_rate_and_its_bytes_are_counted():
    rate = 100 * 10**6
    with SimulatedHosts(2, link_rate="100mbit") as hosts:
        assert all("tbf" in shown and "rate 100Mbit" in shown for shown in _qdiscs(hosts))
        before = hosts.bytes_sent()
        received, seconds = _transfer(hosts)
        after = hosts.bytes_sent()
        assert received == PAYLOAD
        # the bucket's burst (10 ms of traffic) may go ahead of the rate, nothing more
        floor = (PAYLOAD * 8 / rate) - 0.01
        assert seconds >= 0.9 * floor, (seconds, floor)
        sent = [a - b for a, b in zip(after, before)]
        assert sent[0] >= PAYLOAD, sent  # payload plus headers left host 1
        assert sent[1] < PAYLOAD / 10, sent  # host 2 sent acknowledgements only
        hosts.set_link_rate(None)
        assert not any("tbf" in shown for shown in _qdiscs(hosts))
        assert hosts.link_rate is None


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_two_sets_of_hosts_in_one_process_share_nothing():
    # the test session keeps one set for every cross-host test: another must neither collide
    # with it nor tear it down
    with SimulatedHosts(2) as first:
        with SimulatedHosts(2) as second:
            assert set(first.namespaces + [first.switch]).isdisjoint(second.namespaces + [second.switch])
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert all(ns in listed for ns in first.namespaces + second.namespaces)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(ns in listed for ns in first.namespaces) and not any(ns in listed for ns in second.namespaces)
