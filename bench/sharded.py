"""Sharded data parallelism (ZeRO): memory and speed of ``hva.ZeRO(stage=1|2)`` against
``hva.Sync()`` and PyTorch's ``ZeroRedundancyOptimizer`` with DDP (gloo), all with Adam.

Memory: one job per (variant, world size), an MLP of ≥ 100M parameters (``--quick``: 2M), a few
steps: the optimizer-state bytes each rank holds (exact counts) and the peak resident memory
each rank adds to what it held before the model existed (the larger rank). Speed: steps per
second on the overhead benchmark's 10.5M-parameter MLP, one job per variant, the variants in
rotating order per repetition, on one host and across two simulated hosts (``--quick``: the
memory jobs' own timed steps, no job of its own).

Goals (issue 24): state per rank = 1/N of Sync's; peak per rank at 4 ranks ≤ 0.65 × Sync's;
speed ≥ 0.9 × Sync's on one host; at least as fast and as small as ZeroRedundancyOptimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import JobFailed, fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "sharded"
VARIANTS = ["sync", "zero1", "zero2", "zero_ddp"]
LABELS = {"sync": "Sync", "zero1": "ZeRO stage 1", "zero2": "ZeRO stage 2",
          "zero_ddp": "ZeroRedundancyOptimizer + DDP (gloo)"}
#: 8 square layers of 3584: 102.8M parameters (Adam: 1.6 GB of state at one rank).
MEMORY = {False: {"dims": ",".join(["3584"] * 9), "ranks": [2, 4], "batch": 4, "steps": 2},
          True: {"dims": "512,1024,1024,512", "ranks": [2], "batch": 4, "steps": 2}}
#: ``--quick`` times no jobs of its own: the memory jobs' timed steps (after their warm-up) are
#: its speed smoke, one launch per variant instead of two (the worker is the same, only the sizes differed).
SPEED = {False: {"dims": "1024,2048,2048,2048,10", "ranks": 2, "batch": 32, "steps": 20, "warmup": 3, "reps": 3}}
TIMEOUT_S = {False: 900, True: 120}
SPEED_TIMEOUT_S = 180
PEAK_GOAL, SPEED_GOAL = 0.65, 0.9


def _job(part: str, variant: str, ranks: int, cfg: dict[str, Any], quick: bool, hosts: Any = None) -> dict[str, Any]:
    args = ["--part", part, "--variant", variant, "--dims", cfg["dims"], "--batch", str(cfg["batch"]),
            "--steps", str(cfg["steps"]), "--warmup", str(cfg.get("warmup", 1))]
    env = {"MASTER_ADDR": hosts.addresses[0]} if hosts is not None else None
    timeout = TIMEOUT_S[quick] if part == "memory" else SPEED_TIMEOUT_S  # a speed job takes under a minute
    return run_mpi(NAME, ranks, args, timeout=timeout, env=env, hosts=hosts).results[0]


def measure_memory(quick: bool) -> list[dict[str, Any]]:
    cfg = MEMORY[quick]
    rows = []
    for ranks in cfg["ranks"]:
        for variant in VARIANTS:
            r = _job("memory", variant, ranks, cfg, quick)
            added = [rank["phases_mib"]["train"] - rank["phases_mib"]["start"] for rank in r["per_rank"]]
            rows.append({"variant": variant, "ranks": ranks, "parameters": r["parameters"],
                         "state_bytes": [rank["state_bytes"] for rank in r["per_rank"]],
                         "added_mib": max(added), "steps_per_s": r["steps_per_s"], "per_rank": r["per_rank"]})
    for row in rows:
        sync = next(s for s in rows if s["variant"] == "sync" and s["ranks"] == row["ranks"])
        row["state_over_sync"] = max(row["state_bytes"]) / max(sync["state_bytes"])
        row["added_over_sync"] = row["added_mib"] / sync["added_mib"]
    return rows


def speed_of_memory_jobs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``--quick``'s speed: the steps per second each memory job timed at the smallest world."""
    ranks = min(r["ranks"] for r in rows)
    rates = {r["variant"]: [r["steps_per_s"]] for r in rows if r["ranks"] == ranks}
    return {"ranks": ranks, "hosts": 1, "dims": MEMORY[True]["dims"], "from": "the memory jobs",
            "steps_per_s": {v: spread(rates[v]) for v in VARIANTS},
            "over_sync": {v: ratio_spread(rates[v], rates["sync"]) for v in VARIANTS}, "failed": {}}


def measure_speed(quick: bool, hosts: Any = None) -> dict[str, Any]:
    cfg = SPEED[quick]
    ranks = cfg["ranks"] * (hosts.count if hosts is not None else 1)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    failed: dict[str, str] = {}
    for rep in range(cfg["reps"]):
        for variant in VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]:
            if variant in failed:
                continue
            try:
                rates[variant].append(_job("speed", variant, ranks, cfg, quick, hosts)["steps_per_s"])
            except JobFailed as exc:  # PyTorch's baseline across hosts (gloo) may not start: say so, go on
                if variant != "zero_ddp":
                    raise
                failed[variant] = str(exc).splitlines()[0][:300]
                rates[variant] = []
    measured = [v for v in VARIANTS if rates[v]]
    return {"ranks": ranks, "hosts": hosts.count if hosts is not None else 1, "dims": cfg["dims"],
            "steps_per_s": {v: spread(rates[v]) for v in measured},
            "over_sync": {v: ratio_spread(rates[v], rates["sync"]) for v in measured}, "failed": failed}


def run(out: Path, quick: bool) -> dict[str, Any]:
    from hvdagents.testing import SimulatedHosts, unavailable_reason

    memory = measure_memory(quick)
    speed = speed_of_memory_jobs(memory) if quick else measure_speed(quick)
    payload: dict[str, Any] = {"quick": quick, "memory": memory, "speed": [speed]}
    reason = unavailable_reason()
    if reason:
        payload["crosshost_skipped"] = reason
    elif not quick:
        with SimulatedHosts(2) as hosts:
            payload["speed"].append(measure_speed(quick, hosts))
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    biggest = max(r["ranks"] for r in payload["memory"])
    for r in payload["memory"]:
        if r["ranks"] == biggest and r["variant"] != "sync":
            sync = next(s for s in payload["memory"] if s["variant"] == "sync" and s["ranks"] == biggest)
            rows.append([f"Peak memory added per rank, {LABELS[r['variant']]}, {r['parameters'] / 1e6:.0f}M Adam, "
                         f"{biggest} ranks", "MiB (lower is better)", f"{r['added_mib']:.0f}",
                         f"{sync['added_mib']:.0f} Sync", f"{r['added_over_sync']:.2f}"])
    for sp in payload["speed"]:
        for v in [v for v in VARIANTS[1:] if v in sp["steps_per_s"]]:
            rows.append([f"Steps/s, {LABELS[v]}, {sp['ranks']} ranks on {sp['hosts']} host(s)",
                         "steps/s (higher is better)", fmt_spread(sp["steps_per_s"][v]),
                         f"{fmt_spread(sp['steps_per_s']['sync'])} Sync", fmt_spread(sp["over_sync"][v])])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    headers = ["ranks", "variant", "optimizer state per rank (MB)", "/ Sync", "peak added per rank (MiB)", "/ Sync"]
    rows = [[str(r["ranks"]), LABELS[r["variant"]], f"{max(r['state_bytes']) / 1e6:.1f}", f"{r['state_over_sync']:.3f}",
             f"{r['added_mib']:.0f}", f"{r['added_over_sync']:.2f}"] for r in payload["memory"]]
    parts = [f"Adam on an MLP of {payload['memory'][0]['parameters'] / 1e6:.1f}M parameters; memory is the peak "
             "resident memory a rank adds to what it held before the model existed (the larger rank). Goals: "
             f"state = 1/N of Sync's, peak at the largest world ≤ {PEAK_GOAL} × Sync's.\n\n" + md_table(headers, rows)]
    for sp in payload["speed"]:
        srows = [[LABELS[v], fmt_spread(sp["steps_per_s"][v]), fmt_spread(sp["over_sync"][v])] if v in sp["steps_per_s"]
                 else [LABELS[v], "failed: " + sp.get("failed", {}).get(v, "?"), "–"] for v in VARIANTS]
        parts.append(f"Steps per second, MLP {sp['dims']}, {sp['ranks']} ranks on {sp['hosts']} host(s) (goal ≥ "
                     f"{SPEED_GOAL} × Sync):\n\n" + md_table(["variant", "steps/s", "/ Sync"], srows))
    if "crosshost_skipped" in payload:
        parts.append(f"Across hosts: skipped ({payload['crosshost_skipped']}).")
    return "\n\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Bars: peak memory added per rank by variant, one group per world size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    worlds = sorted({r["ranks"] for r in payload["memory"]})
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        values = [next(r["added_mib"] for r in payload["memory"] if r["variant"] == v and r["ranks"] == w)
                  for w in worlds]
        ax.bar([k + i * width for k in range(len(worlds))], values, width, label=LABELS[v])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(worlds))], [f"{w} ranks" for w in worlds])
    ax.set_ylabel("peak MiB added per rank")
    ax.set_title("Adam state and memory per rank", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
