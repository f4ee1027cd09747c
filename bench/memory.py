"""Peak host memory per rank for each strategy, against the same training without an agent.

One 2-rank MPI job per strategy runs ``bench/workers/memory.py`` on a flat model of ``n``
float32 parameters with SGD + momentum (so the optimizer holds one more copy): the baseline is
that process's peak after training without an agent ("start": before the model exists); then
the agent is built, trains, writes and loads a checkpoint and closes. Reported: the peak per
rank (the larger of the two ranks) in MiB and in model sizes, and its ratio to the baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import md_table, pyplot, run_mpi, save_figure, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "memory"
STRATEGIES = ["sync", "localsgd", "downpour", "easgd", "gossip"]
PHASES = ["start", "baseline", "construct", "train", "checkpoint", "close"]
#: ``steps``: with and without the agent; the strategies below exchange every 2 steps
FULL = {"n": 100_000_000, "ranks": 2, "steps": 4}
#: 122 MiB models: what a strategy holds stands above the fixed costs (Horovod, the allocator);
#: one exchange
QUICK = {"n": 32_000_000, "ranks": 2, "steps": 2}
TIMEOUT_S = {False: 600, True: 120}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """One job per strategy; write ``memory.json`` and ``memory.png``; return the payload."""
    settings = QUICK if quick else FULL
    rows = []
    for strategy in STRATEGIES:
        job = run_mpi("memory", settings["ranks"], ["--strategy", strategy, "--n", str(settings["n"]),
                                                    "--steps", str(settings["steps"])], timeout=TIMEOUT_S[quick])
        result = job.results[0]
        worst = {phase: max(rank[phase] for rank in result["phases_mib"]) for phase in PHASES}
        rows.append({
            "strategy": strategy,
            "peak_mib": worst,
            "baseline_mib": worst["baseline"],
            "peak_over_baseline": max(worst.values()) / worst["baseline"],
            "peak_in_models": max(worst.values()) / result["model_mib"],
            "job_s": job.seconds,
        })
    payload = {"quick": quick, "n": settings["n"], "ranks": settings["ranks"],
               "model_mib": settings["n"] * 4 / 2**20, "strategies": rows}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """One row per strategy: peak MiB per rank against the agent-less baseline."""
    return [[f"Peak host memory per rank, {s['strategy']}, {payload['n'] / 1e6:.0f}M float32",
             "MiB (lower is better)", f"{max(s['peak_mib'].values()):.0f}",
             f"{s['baseline_mib']:.0f} without an agent", f"{s['peak_over_baseline']:.2f}"]
            for s in payload["strategies"]]


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md: the peak after each phase, per strategy."""
    headers = ["strategy", *[f"{p} (MiB)" for p in PHASES], "peak / model size"]
    rows = [[s["strategy"], *[f"{s['peak_mib'][p]:.0f}" for p in PHASES], f"{s['peak_in_models']:.1f}"]
            for s in payload["strategies"]]
    return (
        f"A flat PyTorch model of {payload['n'] / 1e6:.0f}M float32 parameters ({payload['model_mib']:.0f} MiB) "
        f"with SGD + momentum, {payload['ranks']} ranks. Peak resident memory of the larger rank after each "
        "phase (peaks only grow); the baseline is the same process training without an agent (model, "
        "gradient, momentum: about 3 model sizes plus the interpreter and PyTorch).\n\n"
        + md_table(headers, rows)
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Bars: peak MiB per strategy, with the baseline marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [s["strategy"] for s in payload["strategies"]]
    ax.bar(names, [max(s["peak_mib"].values()) for s in payload["strategies"]], label="with the agent")
    ax.plot(names, [s["baseline_mib"] for s in payload["strategies"]], "k_", markersize=30,
            label="without an agent")
    ax.set_ylabel("peak MiB per rank")
    ax.set_title(f"Host memory, {payload['n'] / 1e6:.0f}M float32 parameters", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
