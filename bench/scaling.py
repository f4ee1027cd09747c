"""Scaling model: an alpha-beta cost model of one synchronisation at ResNet-50 size.

Three ways of agreeing on ``n`` bytes of parameters among ``p`` nodes, every link full duplex
with latency ``alpha`` per message and ``beta`` seconds per byte in each direction:

- ring all-reduce (Horovod's Sync): ``2 (p-1) alpha + 2 (p-1)/p * n * beta``;
- our sharded store (every agent pushes and pulls the whole vector, shards of ``n/p`` on every
  rank, all ``p`` agents at once): ``2 (p-1) alpha + 2 (p-1)/p * n * beta``;
- a central parameter server (``p`` workers push and pull through one server link):
  ``2 alpha + p * n * beta``.

The derivations are in ``bench/README.md``. ``alpha`` is fitted from this run's small-message
mpi4py all-reduce times (:mod:`bench.allreduce`); ``beta`` comes from the link speed (25 and
100 Gb/s); the measured shared-memory ``beta`` of this machine is reported for reference.
No MPI job: this benchmark only computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._common import md_table, pyplot, read_json, save_figure, write_json

__all__ = ["NAME", "ring_time", "store_time", "server_time", "run", "summary_rows", "markdown"]

NAME = "scaling"
#: ResNet-50: 25.6M float32 parameters.
RESNET50_PARAMETERS = 25_600_000
FLOAT_BYTES = 4
LINKS_GBIT = (25, 100)
NODES = [2**k for k in range(1, 11)]  # 2 ... 1024
TABLE_NODES = (2, 16, 128, 1024)
#: Used only when no all-reduce result exists in the output folder (said so in the output).
ASSUMED_ALPHA_S = 2e-6
BITS_PER_BYTE = 8

MODELS = {
    "ring": "ring all-reduce (Sync)",
    "store": "sharded store push+pull (Downpour/EASGD)",
    "server": "central parameter server",
}


def ring_time(p: int, n_bytes: float, alpha: float, beta: float) -> float:
    """Seconds for a ring all-reduce of ``n_bytes`` over ``p`` nodes."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n_bytes * beta


def store_time(p: int, n_bytes: float, alpha: float, beta: float) -> float:
    """Seconds for every one of ``p`` agents to push and pull ``n_bytes`` through a store sharded
    over the same ``p`` nodes (each link carries ``2 (p-1)/p * n`` bytes each way; the latency
    term counts every message, an upper bound: issued together they overlap)."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n_bytes * beta


def server_time(p: int, n_bytes: float, alpha: float, beta: float) -> float:
    """Seconds for ``p`` workers to push and pull ``n_bytes`` through one server's link
    (``p * n`` bytes each way, overlapping on a full-duplex link)."""
    return 2 * alpha + p * n_bytes * beta


FORMULAS = {"ring": ring_time, "store": store_time, "server": server_time}


def _alpha(out: Path) -> dict[str, Any]:
    measured = read_json(out, "allreduce")
    if measured is None:
        return {"alpha_s": ASSUMED_ALPHA_S, "source": "assumed (no allreduce.json in the output folder)",
                "measured_beta_s_per_byte": None}
    fit = measured["fit"]["mpi"]
    largest = measured["sizes"][-1]
    return {"alpha_s": fit["alpha_s"],
            "source": f"fitted: mpi4py all-reduce, {measured['ranks']} ranks, sizes ≤ {fit['max_bytes']} B",
            "hvd_alpha_s": measured["fit"]["hvd"]["alpha_s"],
            "measured_beta_s_per_byte": 1.0 / largest["bus_bandwidth_Bps"]["mpi"]["median"],
            "measured_beta_at_bytes": largest["bytes"]}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Evaluate the model; write ``scaling.json`` and ``scaling.png``; return the payload."""
    n_bytes = RESNET50_PARAMETERS * FLOAT_BYTES
    alpha = _alpha(out)
    curves: dict[str, dict[str, list[float]]] = {}
    for gbit in LINKS_GBIT:
        beta = BITS_PER_BYTE / (gbit * 1e9)
        curves[f"{gbit}"] = {m: [f(p, n_bytes, alpha["alpha_s"], beta) for p in NODES] for m, f in FORMULAS.items()}
    payload = {"quick": quick, "parameters": RESNET50_PARAMETERS, "bytes": n_bytes, "nodes": NODES,
               "links_gbit": list(LINKS_GBIT), "alpha": alpha,
               "beta_s_per_byte": {f"{g}": BITS_PER_BYTE / (g * 1e9) for g in LINKS_GBIT},
               "seconds": curves}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: the three models at the largest node count, fastest link."""
    p = payload["nodes"][-1]
    gbit = f"{max(payload['links_gbit'])}"
    s = {m: v[-1] for m, v in payload["seconds"][gbit].items()}
    return [[f"Model: ResNet-50 ({payload['parameters'] / 1e6:.1f}M float32), {p} nodes, {gbit} Gb/s",
             "s per synchronisation (lower is better)", f"{_fmt_s(s['ring'])} ring, {_fmt_s(s['store'])} store",
             f"{_fmt_s(s['server'])} central server", f"{s['store'] / s['server']:.3g} (store / server)"]]


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    a = payload["alpha"]
    rows = []
    for gbit in payload["links_gbit"]:
        for m, label in MODELS.items():
            values = payload["seconds"][f"{gbit}"][m]
            rows.append([f"{gbit} Gb/s", label] + [_fmt_s(values[payload["nodes"].index(p)]) for p in TABLE_NODES])
    ref = ""
    if a.get("measured_beta_s_per_byte"):
        beta = a["measured_beta_s_per_byte"]
        ref = (f" For reference, this machine's shared memory gave β = {beta * 1e9:.3f} ns/B "
               f"({1 / beta / 1e9:.2f} GB/s bus bandwidth at {a['measured_beta_at_bytes']} B), "
               f"and Horovod's fitted latency was {a['hvd_alpha_s'] * 1e6:.0f} µs per all-reduce.")
    betas = ", ".join(f"{g} Gb/s: β = {payload['beta_s_per_byte'][f'{g}'] * 1e9:.3f} ns/B"
                      for g in payload["links_gbit"])
    return (
        f"n = {payload['parameters'] / 1e6:.1f}M float32 = {payload['bytes'] / 1e6:.1f} MB; α = "
        f"{a['alpha_s'] * 1e6:.2f} µs ({a['source']}); β from the link speed ({betas}).{ref} "
        "Formulas and derivations: `bench/README.md`.\n\n"
        + md_table(["link", "model"] + [f"p = {p}" for p in TABLE_NODES], rows)
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Time per synchronisation against nodes, log-log; colour by model, line style by link."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"ring": "tab:blue", "store": "tab:green", "server": "tab:red"}
    styles = dict(zip(payload["links_gbit"], ("-", "--", ":")))
    nodes = np.asarray(payload["nodes"])
    for gbit in payload["links_gbit"]:
        for m, label in MODELS.items():
            marker = "o" if m == "store" else None
            ax.plot(nodes, payload["seconds"][f"{gbit}"][m], color=colors[m], ls=styles[gbit], marker=marker,
                    markersize=3, label=f"{label}, {gbit} Gb/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes p")
    ax.set_ylabel("seconds per synchronisation")
    alpha_us = payload["alpha"]["alpha_s"] * 1e6
    ax.set_title(f"α–β model, ResNet-50 ({payload['bytes'] / 1e6:.0f} MB), α = {alpha_us:.2g} µs", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
