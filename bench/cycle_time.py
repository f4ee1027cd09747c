"""Horovod's cycle time, the setting hvdagents chooses (``hvdagents.horovod_settings``).

One job per world size (1 rank: a spare core for Horovod's thread on this 2-core machine;
2 ranks: one core each), sweeping ``HOROVOD_CYCLE_TIME`` inside the job in rotating order
(``bench/workers/cycle_time.py``): a 4 KiB all-reduce's latency, the 85K-parameter MLP's
steps/s under Horovod (2 ranks), and the CPU the idle background thread uses. Ratios are
against Horovod's own 1 ms in the same job, per repetition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "cycle_time"
BASE = "1"
FULL = {"cycle_times": ["1", "0.5", "0.2", "0.1", "0.05"], "reps": 5, "ops": 200, "idle_s": 2.0, "ranks": [1, 2]}
QUICK = {"cycle_times": ["1", "0.1"], "reps": 1, "ops": 10, "idle_s": 0.2, "ranks": [1, 2]}
TIMEOUT_S = {False: 900, True: 120}


def run(out: Path, quick: bool) -> dict[str, Any]:
    settings = QUICK if quick else FULL
    worlds = {}
    for ranks in settings["ranks"]:
        args = ["--cycle-times", ",".join(settings["cycle_times"]), "--reps", str(settings["reps"]),
                "--ops", str(settings["ops"]), "--idle-s", str(settings["idle_s"])]
        job = run_mpi("cycle_time", ranks, args, timeout=TIMEOUT_S[quick])
        raw = job.results[0]["results"]
        worlds[str(ranks)] = {
            "raw": raw,
            "latency_us": {c: spread([v * 1e6 for v in r["latency_s"]]) for c, r in raw.items()},
            "steps_per_s": {c: spread(r["steps_per_s"]) for c, r in raw.items()},
            "idle_cpu_percent": {c: spread([v * 100 for v in r["idle_cpu"]]) for c, r in raw.items()},
            "steps_vs_1ms": {c: ratio_spread(r["steps_per_s"], raw[BASE]["steps_per_s"]) for c, r in raw.items()},
        }
    payload = {"quick": quick, "cycle_times_ms": settings["cycle_times"], "worlds": worlds}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    for ranks, w in payload["worlds"].items():
        best = min(payload["cycle_times_ms"], key=lambda c: w["latency_us"][c]["median"])
        rows.append([f"Horovod 4 KiB all-reduce, {ranks} rank(s), cycle {best} ms vs 1 ms", "µs (lower is better)",
                     fmt_spread(w["latency_us"][best]), f"{fmt_spread(w['latency_us'][BASE])} at 1 ms",
                     f"{w['latency_us'][best]['median'] / w['latency_us'][BASE]['median']:.2f}"])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    rows = []
    for ranks, w in payload["worlds"].items():
        for c in payload["cycle_times_ms"]:
            steps = (f"{fmt_spread(w['steps_per_s'][c])} ({fmt_spread(w['steps_vs_1ms'][c])})"
                     if ranks != "1" else "(one rank: no all-reduce in the step)")
            rows.append([ranks, c, fmt_spread(w["latency_us"][c]), steps, fmt_spread(w["idle_cpu_percent"][c])])
    return ("`HOROVOD_CYCLE_TIME` swept inside one job per world size, rotating order; medians [min–max] over "
            "repetitions. Idle CPU: % of one core the busiest rank uses while it sleeps with Horovod running.\n\n"
            + md_table(["ranks", "cycle ms", "4 KiB all-reduce µs", "MLP steps/s (vs 1 ms)", "idle CPU %"], rows))


def plot(payload: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    cycles = payload["cycle_times_ms"]
    xs = [float(c) for c in cycles]
    for ranks, w in payload["worlds"].items():
        axes[0].plot(xs, [w["latency_us"][c]["median"] for c in cycles], "o-", label=f"{ranks} rank(s)")
        axes[1].plot(xs, [w["idle_cpu_percent"][c]["median"] for c in cycles], "o-", label=f"{ranks} rank(s)")
    for ax, label in zip(axes, ("4 KiB all-reduce (µs)", "idle Horovod thread (% of a core)")):
        ax.set_xscale("log")
        ax.set_xlabel("HOROVOD_CYCLE_TIME (ms)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
