"""Across two simulated hosts (network namespaces, TCP only; :mod:`hvdagents.testing`): the
all-reduce benchmark with one rank per host (Horovod against mpi4py in the same job), and the
one-sided probe the asynchronous agents run before their first window.

Needs root and iproute2 (the hosts); elsewhere the section says why it was skipped. Both hosts
share this machine's 2 cores, so this measures the TCP path and Horovod's behaviour over it,
not a real network's bandwidth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import allreduce
from ._common import run_mpi, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "crosshost"
HOSTS = 2


def run(out: Path, quick: bool) -> dict[str, Any]:
    from hvdagents.testing import SimulatedHosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        payload: dict[str, Any] = {"quick": quick, "hosts": HOSTS, "skipped": reason}
    else:
        with SimulatedHosts(HOSTS) as hosts:
            probe = run_mpi("one_sided_probe", 2 * HOSTS, timeout=120, hosts=hosts).results[0]
            payload = {"quick": quick, "hosts": HOSTS, "allreduce": allreduce.measure(quick, hosts=hosts),
                       "one_sided": probe}
    write_json(out, NAME, payload)
    if "allreduce" in payload:
        allreduce.plot(payload["allreduce"], out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    if "allreduce" not in payload:
        return []
    rows = allreduce.summary_rows(payload["allreduce"])
    for row in rows:
        row[0] = row[0].replace("ranks)", f"ranks on {payload['hosts']} hosts)").replace(
            "(grouped, fused)", f"(grouped, fused; {payload['hosts']} hosts)")
    return rows


def markdown(payload: dict[str, Any]) -> str:
    if "allreduce" not in payload:
        return f"Skipped: {payload['skipped']}."
    verdict = payload["one_sided"]
    return (
        f"{payload['hosts']} simulated hosts (network namespaces, TCP between them), one rank per host for the "
        "all-reduce; both hosts share this machine's cores.\n\n"
        f"**One-sided windows across the hosts** (2 ranks per host, the probe every agent runs): "
        f"{'available' if verdict['ok'] else 'refused'} — {verdict['detail']}.\n\n"
        + allreduce.markdown(payload["allreduce"])
    )
