"""All-reduce bandwidth: our sync path (Horovod's torch binding, as the agents call it) against
raw mpi4py ``Allreduce``, 4 KiB to 64 MiB on 2 ranks; and 200 small tensors, where Horovod's
tensor fusion is compared with one ``Allreduce`` per tensor.

Bus bandwidth is ``2 (p - 1) / p * bytes / time`` (the bytes every rank's link carries in a
ring all-reduce, per second), computed per repetition. The small-message times also give the
latency ``alpha`` of the alpha-beta model (:mod:`bench.scaling`): a least-squares line
``t = 2 (p - 1) alpha + 2 (p - 1) / p * bytes * beta`` through the medians up to
``FIT_MAX_BYTES``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._common import fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "run", "measure", "summary_rows", "markdown", "plot", "bus_bandwidth", "fit_alpha_beta"]

NAME = "allreduce"
RANKS = 2
KIB, MIB = 1024, 1024 * 1024
#: 4 KiB, 16 KiB, ..., 64 MiB (powers of 4).
FULL = {"sizes": [4 * KIB * 4**i for i in range(8)], "reps": 7, "target_s": 0.15}
QUICK = {"sizes": [4 * KIB, 64 * KIB, 1 * MIB], "reps": 1, "target_s": 0.01}
SMALL_COUNT, SMALL_BYTES = 200, 16 * KIB
#: Sizes up to this many bytes enter the latency fit.
FIT_MAX_BYTES = 256 * KIB
TIMEOUT_S = {False: 600, True: 120}

SMALL_LABELS = {
    "hvd_grouped": "ours: one grouped_allreduce_ (TorchAgent.average_parameters)",
    "hvd_async": "ours: allreduce_async_ per tensor, fused by Horovod (DistributedOptimizer hooks)",
    "mpi_each": "mpi4py: one Allreduce per tensor",
    "mpi_packed": "mpi4py: pack, one Allreduce, unpack (fusion by hand)",
}


def bus_bandwidth(nbytes: float, seconds: float, ranks: int) -> float:
    """Bus bandwidth in bytes/s of an all-reduce of ``nbytes`` over ``ranks`` taking ``seconds``."""
    return 2 * (ranks - 1) / ranks * nbytes / seconds


def fit_alpha_beta(sizes: list[int], seconds: list[float], ranks: int) -> dict[str, float]:
    """Least-squares ``t = 2 (p-1) alpha + 2 (p-1)/p * n * beta``; alpha clipped at 0."""
    x = np.asarray(sizes, dtype=np.float64) * 2 * (ranks - 1) / ranks
    t = np.asarray(seconds, dtype=np.float64)
    beta, intercept = np.polyfit(x, t, 1)
    return {"alpha_s": max(float(intercept) / (2 * (ranks - 1)), 0.0), "beta_s_per_byte": max(float(beta), 0.0),
            "max_bytes": int(max(sizes)), "points": len(sizes)}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Run the all-reduce job; write ``allreduce.json`` and ``allreduce.png``; return the payload."""
    payload = measure(quick)
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def measure(quick: bool, hosts: Any = None) -> dict[str, Any]:
    """The all-reduce job on :data:`RANKS` ranks (one per host with ``hosts``); its payload."""
    settings = QUICK if quick else FULL
    args = ["--sizes", ",".join(map(str, settings["sizes"])), "--reps", str(settings["reps"]),
            "--target-s", str(settings["target_s"]), "--small-count", str(SMALL_COUNT),
            "--small-bytes", str(SMALL_BYTES)]
    job = run_mpi("allreduce", RANKS, args, timeout=TIMEOUT_S[quick], hosts=hosts)
    result = job.results[0]
    ranks = result["ranks"]
    sizes = []
    for size_text, times in result["single_s"].items():
        size = int(size_text)
        bw = {k: [bus_bandwidth(size, t, ranks) for t in v] for k, v in times.items()}
        sizes.append({
            "bytes": size,
            "seconds": {k: spread(v) for k, v in times.items()},
            "bus_bandwidth_Bps": {k: spread(v) for k, v in bw.items()},
            "bandwidth_ratio_hvd_over_mpi": ratio_spread(bw["hvd"], bw["mpi"]),
            "raw_seconds": times,
        })
    small_rounds = result["small"]["round_s"]
    small_bytes = result["small"]["count"] * result["small"]["bytes"]
    small = {
        "count": result["small"]["count"],
        "bytes_each": result["small"]["bytes"],
        "round_s": {k: spread(v) for k, v in small_rounds.items()},
        "speedup_vs_mpi_each": {k: ratio_spread(small_rounds["mpi_each"], v) for k, v in small_rounds.items()},
        "bus_bandwidth_Bps": {k: spread([bus_bandwidth(small_bytes, t, ranks) for t in v])
                              for k, v in small_rounds.items()},
        "raw_round_s": small_rounds,
    }
    fit_points = [s for s in sizes if s["bytes"] <= FIT_MAX_BYTES] or sizes[:2]
    fits = {k: fit_alpha_beta([s["bytes"] for s in fit_points], [s["seconds"][k]["median"] for s in fit_points],
                              ranks) for k in ("mpi", "hvd")}
    lat = result["latency"]
    latency = {"bytes": lat["bytes"], "ops": lat["ops"], "stall_factor": lat["stall_factor"],
               "median_s": {k: spread(v) for k, v in lat["median_s"].items()},
               "ratio_hvd_over_mpi": ratio_spread(lat["median_s"]["hvd"], lat["median_s"]["mpi"]),
               "stalled_share": {k: spread(v) for k, v in lat["stalled_share"].items()},
               "raw_median_s": lat["median_s"]}
    horovod_env = result.get("horovod_env") or {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")}
    return {"ranks": ranks, "quick": quick, "job_s": job.seconds, "sizes": sizes, "small_tensors": small,
            "latency": latency, "fit": fits, "horovod_env": horovod_env}


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: the smallest and largest message, and the small tensors."""
    rows = []
    for s in (payload["sizes"][0], payload["sizes"][-1]):
        bw = s["bus_bandwidth_Bps"]
        rows.append([f"All-reduce, one {_size_label(s['bytes'])} tensor ({payload['ranks']} ranks)",
                     "bus bandwidth GB/s (higher is better)", fmt_spread(bw["hvd"], scale=1e-9),
                     f"{fmt_spread(bw['mpi'], scale=1e-9)} mpi4py Allreduce",
                     fmt_spread(s["bandwidth_ratio_hvd_over_mpi"])])
    lat = payload.get("latency")
    if lat:  # results written before the latency part have none
        rows.append([f"All-reduce latency, one {_size_label(lat['bytes'])} tensor, median of {lat['ops']} "
                     "timed one by one", "µs (lower is better)", fmt_spread(lat["median_s"]["hvd"], scale=1e6),
                     f"{fmt_spread(lat['median_s']['mpi'], scale=1e6)} mpi4py Allreduce",
                     f"{fmt_spread(lat['ratio_hvd_over_mpi'])} (time; stalled: "
                     f"{lat['stalled_share']['hvd']['median']:.0%} vs {lat['stalled_share']['mpi']['median']:.0%})"])
    small = payload["small_tensors"]
    rt = small["round_s"]
    rows.append([f"All-reduce, {small['count']} tensors of {_size_label(small['bytes_each'])} (grouped, fused)",
                 "ms per round (lower is better)", fmt_spread(rt["hvd_grouped"], scale=1e3),
                 f"{fmt_spread(rt['mpi_each'], scale=1e3)} one mpi4py Allreduce per tensor",
                 fmt_spread(ratio_spread(payload["small_tensors"]["raw_round_s"]["hvd_grouped"],
                                         payload["small_tensors"]["raw_round_s"]["mpi_each"]))])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    rows = []
    for s in payload["sizes"]:
        sec, bw = s["seconds"], s["bus_bandwidth_Bps"]
        rows.append([_size_label(s["bytes"]), fmt_spread(sec["hvd"], scale=1e6), fmt_spread(sec["mpi"], scale=1e6),
                     fmt_spread(bw["hvd"], scale=1e-9), fmt_spread(bw["mpi"], scale=1e-9),
                     fmt_spread(s["bandwidth_ratio_hvd_over_mpi"]), fmt_spread(sec["mpi_beside_hvd"], scale=1e6)])
    small = payload["small_tensors"]
    lat = payload.get("latency")
    latency_text = "" if not lat else (
        f"\n\nLatency, {lat['ops']} all-reduces of {_size_label(lat['bytes'])} timed one by one (median per "
        f"repetition): ours {fmt_spread(lat['median_s']['hvd'], scale=1e6)} µs, mpi4py "
        f"{fmt_spread(lat['median_s']['mpi'], scale=1e6)} µs, ratio {fmt_spread(lat['ratio_hvd_over_mpi'])}; "
        f"operations over {lat['stall_factor']}× the median (a thread that lost its core): ours "
        f"{fmt_spread(lat['stalled_share']['hvd'])}, mpi4py {fmt_spread(lat['stalled_share']['mpi'])}. The "
        "table's µs are means over many operations and include those stalls.")
    small_rows = [[SMALL_LABELS[k], fmt_spread(v, scale=1e3), fmt_spread(small["bus_bandwidth_Bps"][k], scale=1e-9),
                   fmt_spread(small["speedup_vs_mpi_each"][k])] for k, v in small["round_s"].items()]
    fm, fh = payload["fit"]["mpi"], payload["fit"]["hvd"]
    return (
        f"{payload['ranks']} ranks, float32 sum, in place. Ours: `hvdagents.runtime.horovod_binding('torch')`'s "
        "`allreduce_` on a torch tensor; baseline: mpi4py `Allreduce(IN_PLACE, ...)` on a NumPy array. "
        "Bus bandwidth = 2(p−1)/p · bytes / time. The baseline runs with Horovod shut down: Horovod's "
        "background thread polls MPI even when idle (about one core's worth on one of the two ranks here), "
        "which slows every other MPI call in its process; the last column shows mpi4py's all-reduce beside a "
        "live Horovod, as the asynchronous strategies' RMA calls run inside an agent.\n\n"
        + md_table(["size", "ours µs", "mpi4py µs", "ours GB/s", "mpi4py GB/s", "ours / mpi4py (bandwidth)",
                    "mpi4py beside Horovod µs"], rows)
        + latency_text
        + f"\n\n{small['count']} tensors of {_size_label(small['bytes_each'])} "
        f"({small['count'] * small['bytes_each'] / MIB:.2f} MiB in all), one round each:\n\n"
        + md_table(["path", "ms per round", "bus GB/s", "speed-up vs one Allreduce per tensor"], small_rows)
        + f"\n\nLatency fit through sizes ≤ {_size_label(fm['max_bytes'])} (t = 2(p−1)α + 2(p−1)/p·n·β): "
        f"mpi4py α = {fm['alpha_s'] * 1e6:.1f} µs, β = {fm['beta_s_per_byte'] * 1e9:.3f} ns/B; "
        f"Horovod α = {fh['alpha_s'] * 1e6:.1f} µs. Horovod's small-message time is its negotiation cycle "
        f"(`HOROVOD_CYCLE_TIME`, here {payload['horovod_env'].get('HOROVOD_CYCLE_TIME') or 'the default'}): "
        "the background thread starts pending all-reduces once per cycle, a fixed cost per all-reduce "
        "rather than per ring step (see `bench/README.md`)."
        + " " + _fusion_note(payload)
    )


def _fusion_note(payload: dict[str, Any]) -> str:
    """What the small-tensor numbers say about fusion (worded from the measured medians)."""
    rt = payload["small_tensors"]["round_s"]
    count = payload["small_tensors"]["count"]
    network = (f" Over a network (α of 2–50 µs per message, 2α per 2-rank all-reduce) {count} separate calls "
               f"would cost {count * 2 * 2e-3:.1f}–{count * 2 * 50e-3:.0f} ms of latency alone, which one fused "
               "all-reduce avoids.")
    if rt["hvd_grouped"]["median"] > rt["mpi_each"]["median"]:
        return (f"Fusion through Horovod does not pay on this machine: shared-memory MPI latency is a few µs, so "
                f"{count} separate `Allreduce`s cost less than one Horovod cycle"
                + ("; packing by hand beats both." if rt["mpi_packed"]["median"] < rt["mpi_each"]["median"] else ".")
                + network)
    return " Fusion pays here." + network


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Bus bandwidth against size (median line, min–max band); small-tensor rounds as bars."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    sizes = [s["bytes"] for s in payload["sizes"]]
    for key, label, color, style in (("hvd", "ours (Horovod, torch binding)", "tab:blue", "o-"),
                                     ("mpi", "mpi4py Allreduce", "tab:orange", "o-"),
                                     ("mpi_beside_hvd", "mpi4py beside a live Horovod", "tab:gray", "x:")):
        bw = [s["bus_bandwidth_Bps"][key] for s in payload["sizes"]]
        ax.plot(sizes, [b["median"] / 1e9 for b in bw], style, color=color, label=label)
        ax.fill_between(sizes, [b["min"] / 1e9 for b in bw], [b["max"] / 1e9 for b in bw], color=color, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [_size_label(s) for s in sizes], rotation=45, fontsize=7)
    ax.set_xlabel("message size")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"All-reduce, {payload['ranks']} ranks (median, min–max)", fontsize=10)
    ax.legend(fontsize=7)
    small = payload["small_tensors"]
    keys = list(small["round_s"])
    med = [small["round_s"][k]["median"] * 1e3 for k in keys]
    err = [[(small["round_s"][k]["median"] - small["round_s"][k]["min"]) * 1e3 for k in keys],
           [(small["round_s"][k]["max"] - small["round_s"][k]["median"]) * 1e3 for k in keys]]
    colors = ["tab:blue" if k.startswith("hvd") else "tab:orange" for k in keys]
    bx.bar([k.replace("_", "\n") for k in keys], med, yerr=err, capsize=3, color=colors)
    bx.set_ylabel("ms per round")
    bx.set_title(f"{small['count']} × {_size_label(small['bytes_each'])} tensors", fontsize=10)
    return save_figure(fig, path)
