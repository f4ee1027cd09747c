"""Parameter store throughput: ``hva.ParameterWindow`` (one-sided, sharded) against the
machine's copy bandwidth and a two-sided parameter server in the style of mpi_learn/NNLO.

One MPI job per world size (2 and 4 ranks) runs ``bench/workers/store.py``: every rank
pushes and/or pulls a vector of ``n`` float32 as fast as it can for a fixed time, phases in
rotating order per repetition. Throughput is summed over the ranks doing the operation:
all p ranks for the window and memcpy, the p - 1 workers for the two-sided server (rank 0
only serves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "store"
FULL = {"ranks": [2, 4], "n": 1_000_000, "duration": 1.0, "reps": 5}
QUICK = {"ranks": [2], "n": 65_536, "duration": 0.1, "reps": 1}
TIMEOUT_S = {False: 300, True: 90}
FLOAT_BYTES = 4

#: Bytes moved by one operation of each phase, in vectors (push+pull moves two).
VECTORS_PER_OP = {"memcpy": 1, "push": 1, "pull": 1, "push_pull": 2, "push_pull_beside_hvd": 2, "server": 2}
LABELS = {
    "memcpy": "memcpy (np.copyto) on every rank",
    "push": "ParameterWindow.push (Accumulate SUM)",
    "pull": "ParameterWindow.pull (Get_accumulate NO_OP)",
    "push_pull": "ParameterWindow push + pull (one update)",
    "push_pull_beside_hvd": "ParameterWindow push + pull beside a live Horovod (a process with a Sync agent)",
    "server": "two-sided server: Send update, Recv parameters",
}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Run one job per world size; write ``store.json`` and ``store.png``; return the payload."""
    settings = QUICK if quick else FULL
    worlds = []
    for ranks in settings["ranks"]:
        args = ["--n", str(settings["n"]), "--duration", str(settings["duration"]), "--reps", str(settings["reps"])]
        job = run_mpi("store", ranks, args, timeout=TIMEOUT_S[quick])
        result = job.results[0]
        ops = result["ops_per_s"]
        vector_bytes = result["n"] * result["itemsize"]
        worlds.append({
            "ranks": ranks,
            "server_workers": result["server_workers"],
            "job_s": job.seconds,
            "ops_per_s": {k: spread(v) for k, v in ops.items()},
            "GBps": {k: spread([x * VECTORS_PER_OP[k] * vector_bytes / 1e9 for x in v]) for k, v in ops.items()},
            "updates_ratio_window_over_server": ratio_spread(ops["push_pull"], ops["server"]),
            "push_bandwidth_over_memcpy": ratio_spread(ops["push"], ops["memcpy"]),
            "pull_bandwidth_over_memcpy": ratio_spread(ops["pull"], ops["memcpy"]),
            "raw_ops_per_s": ops,
        })
    payload = {"quick": quick, "n": settings["n"], "vector_bytes": settings["n"] * FLOAT_BYTES,
               "duration_s": settings["duration"], "worlds": worlds}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: updates/s against the server, push GB/s against memcpy."""
    mb = payload["vector_bytes"] / 1e6
    rows = []
    for w in payload["worlds"]:
        ops, gb = w["ops_per_s"], w["GBps"]
        rows.append([f"Parameter store, {w['ranks']} ranks, push+pull of {mb:.0f} MB",
                     "updates/s, all agents (higher is better)", fmt_spread(ops["push_pull"]),
                     f"{fmt_spread(ops['server'])} two-sided server ({w['server_workers']} workers)",
                     fmt_spread(w["updates_ratio_window_over_server"])])
        rows.append([f"Parameter store, {w['ranks']} ranks, push of {mb:.0f} MB",
                     "GB/s, all ranks (higher is better)", fmt_spread(gb["push"]),
                     f"{fmt_spread(gb['memcpy'])} memcpy", fmt_spread(w["push_bandwidth_over_memcpy"])])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    rows = []
    for w in payload["worlds"]:
        for k, s in w["ops_per_s"].items():
            rows.append([str(w["ranks"]), LABELS[k], fmt_spread(s), fmt_spread(w["GBps"][k])])
    return (
        f"A vector of {payload['vector_bytes'] / 1e6:.1f} MB (float32), every rank operating as fast as it can for "
        f"{payload['duration_s']} s per phase and repetition. Rates are summed over the ranks doing the operation "
        "(the server has p − 1 workers; the window's p agents are all workers, the store being sharded over "
        "them). GB/s counts the vector bytes moved (two vectors per update).\n\n"
        + md_table(["ranks", "operation", "ops/s median [min–max]", "GB/s"], rows)
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Grouped bars of GB/s per operation, one group per world size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    keys = list(VECTORS_PER_OP)
    width = 0.8 / max(len(payload["worlds"]), 1)
    for i, w in enumerate(payload["worlds"]):
        med = [w["GBps"][k]["median"] for k in keys]
        err = [[w["GBps"][k]["median"] - w["GBps"][k]["min"] for k in keys],
               [w["GBps"][k]["max"] - w["GBps"][k]["median"] for k in keys]]
        ax.bar([j + i * width for j in range(len(keys))], med, width, yerr=err, capsize=3,
               label=f"{w['ranks']} ranks")
    ax.set_xticks([j + width * (len(payload["worlds"]) - 1) / 2 for j in range(len(keys))],
                  [k.replace("push_pull", "push+pull").replace("_beside_hvd", "\n+hvd") for k in keys], fontsize=8)
    ax.set_ylabel("GB/s, summed over ranks")
    ax.set_title(f"Parameter store, {payload['vector_bytes'] / 1e6:.0f} MB vector (median, min–max)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
