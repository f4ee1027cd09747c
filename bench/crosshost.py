"""Across two simulated hosts (network namespaces, TCP only; :mod:`hvdagents.testing`): the
all-reduce benchmark with one rank per host (Horovod against mpi4py in the same job); the
windows' operations between the hosts through the relay (``workers/cross_node_store.py``:
push/pull bandwidth against two-sided MPI bandwidth, push + pull to a rank busy computing
against a two-sided ping-pong, the service thread's cost), one job per repetition; and MPI's
own one-sided probe between the hosts (what ``HVDAGENTS_WINDOWS=mpi`` would use).

Needs root and iproute2 (the hosts); elsewhere the section says why it was skipped. Both hosts
share this machine's 2 cores, so this measures the TCP path and Horovod's behaviour over it,
not a real network's bandwidth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import allreduce
from ._common import fmt_spread, md_table, ratio_spread, run_mpi, spread, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "crosshost"
HOSTS = 2
#: Store runs (jobs) and their settings: message size of the bandwidth runs, repetitions
#: inside a job, seconds the target computes.
STORE = {False: {"jobs": 3, "mib": 16, "reps": 5, "busy_s": 4.0}, True: {"jobs": 1, "mib": 4, "reps": 2, "busy_s": 1.0}}
#: Issue 10's bars: throughput >= half the two-sided bandwidth; busy push + pull <= the larger
#: of 50 ms and 6 two-sided ping-pongs of 4 MB.
THROUGHPUT_BAR, BUSY_FLOOR_S, BUSY_PINGPONGS = 0.5, 0.050, 6


def measure_store(quick: bool, hosts: Any) -> dict[str, Any]:
    """Run the store worker once per job, one rank per host; spreads over the jobs."""
    cfg = STORE[quick]
    args = ["--mib", str(cfg["mib"]), "--reps", str(cfg["reps"]), "--busy-s", str(cfg["busy_s"])]
    runs = [run_mpi("cross_node_store", HOSTS, args, timeout=300, hosts=hosts).results[0] for _ in range(cfg["jobs"])]
    two_sided = [r["two_sided_gbs"] for r in runs]
    busy = {kind: [sorted(r["busy_push_pull_s"][kind])[len(r["busy_push_pull_s"][kind]) // 2] for r in runs]
            for kind in runs[0]["busy_push_pull_s"]}
    bars = [max(BUSY_FLOOR_S, BUSY_PINGPONGS * r["pingpong_4mb_s"]) for r in runs]
    return {
        "settings": cfg, "runs": runs,
        "two_sided_gbs": spread(two_sided),
        "push_gbs": spread([r["push_gbs"] for r in runs]),
        "pull_gbs": spread([r["pull_gbs"] for r in runs]),
        "push_over_two_sided": ratio_spread([r["push_gbs"] for r in runs], two_sided),
        "pull_over_two_sided": ratio_spread([r["pull_gbs"] for r in runs], two_sided),
        "pingpong_4mb_s": spread([r["pingpong_4mb_s"] for r in runs]),
        "busy_push_pull_s": {kind: spread(v) for kind, v in busy.items()},
        "busy_over_bar": {kind: ratio_spread(v, bars) for kind, v in busy.items()},
        "exact": all(r["exact"] for r in runs),
        "idle_thread_cpu": spread([r["idle_thread_cpu"] for r in runs]),
        "work_slowdown": spread([r["work_slowdown"] for r in runs]),
    }


def run(out: Path, quick: bool) -> dict[str, Any]:
    from hvdagents.testing import SimulatedHosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        payload: dict[str, Any] = {"quick": quick, "hosts": HOSTS, "skipped": reason}
    else:
        with SimulatedHosts(HOSTS) as hosts:
            probe = run_mpi("one_sided_probe", 2 * HOSTS, timeout=120, hosts=hosts).results[0]
            payload = {"quick": quick, "hosts": HOSTS, "allreduce": allreduce.measure(quick, hosts=hosts),
                       "store": measure_store(quick, hosts), "one_sided": probe}
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
    st = payload["store"]
    mib = st["settings"]["mib"]
    for what in ("push", "pull"):
        rows.append([f"Store {what} of {mib} MiB between 2 hosts (relay)", "GB/s (higher is better)",
                     fmt_spread(st[f"{what}_gbs"]), f"{fmt_spread(st['two_sided_gbs'])} two-sided Send/Recv",
                     fmt_spread(st[f"{what}_over_two_sided"])])
    for kind, label in (("numpy", "NumPy"), ("python", "pure Python")):
        rows.append([f"Push + pull 4 MB to a rank on the other host computing ({label})", "ms (lower is better)",
                     fmt_spread(st["busy_push_pull_s"][kind], scale=1e3),
                     f"{fmt_spread(st['pingpong_4mb_s'], scale=1e3)} two-sided 4 MB ping-pong",
                     f"{fmt_spread(st['busy_over_bar'][kind])} of the bar"])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    if "allreduce" not in payload:
        return f"Skipped: {payload['skipped']}."
    verdict = payload["one_sided"]
    return (
        f"{payload['hosts']} simulated hosts (network namespaces, TCP between them), one rank per host for the "
        "all-reduce; both hosts share this machine's cores.\n\n"
        + _store_markdown(payload["store"])
        + f"**MPI's own one-sided windows across the hosts** (`HVDAGENTS_WINDOWS=mpi`; 2 ranks per host, "
        f"the probe): {'available' if verdict['ok'] else 'refused'} — {verdict['detail']}.\n\n"
        + allreduce.markdown(payload["allreduce"])
    )


def _store_markdown(st: dict[str, Any]) -> str:
    cfg = st["settings"]
    rows = [
        ["two-sided Send/Recv bandwidth", f"{fmt_spread(st['two_sided_gbs'])} GB/s", "–"],
        ["push (deliver to the other host's memory)", f"{fmt_spread(st['push_gbs'])} GB/s",
         f"{fmt_spread(st['push_over_two_sided'])} of two-sided (bar ≥ {THROUGHPUT_BAR})"],
        ["pull (read the other host's memory)", f"{fmt_spread(st['pull_gbs'])} GB/s",
         f"{fmt_spread(st['pull_over_two_sided'])} of two-sided (bar ≥ {THROUGHPUT_BAR})"],
        ["two-sided 4 MB ping-pong", f"{fmt_spread(st['pingpong_4mb_s'], scale=1e3)} ms", "–"],
    ]
    for kind in st["busy_push_pull_s"]:
        rows.append([f"push + pull 4 MB, target computing ({kind})",
                     f"{fmt_spread(st['busy_push_pull_s'][kind], scale=1e3)} ms",
                     f"{fmt_spread(st['busy_over_bar'][kind])} of max({BUSY_FLOOR_S * 1e3:g} ms, "
                     f"{BUSY_PINGPONGS} ping-pongs)"])
    rows.append(["service thread, idle", f"{fmt_spread(st['idle_thread_cpu'], scale=100)} % of a core", "–"])
    rows.append(["fixed NumPy work beside an idle service thread", f"{fmt_spread(st['work_slowdown'])} × its "
                 "time before any window", "–"])
    return (f"**The windows between the hosts** (the default `HVDAGENTS_WINDOWS=auto`: MPI windows inside a "
            f"host, the relay between hosts; one rank per host, {cfg['jobs']} job(s), {cfg['mib']} MiB messages, "
            f"target computing {cfg['busy_s']:g} s; every push arrived exactly: {st['exact']}):\n\n"
            + md_table(["", "measured", "against"], rows) + "\n\n")
