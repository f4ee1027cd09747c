"""DiLoCo against Sync trained to the plateau, on the slow link: the goals of issue 25 at equal
samples where the models have stopped improving (``lowbandwidth`` stops at 300 steps, early in
training, where every weak method still trails ``Sync``).

Two simulated hosts × 2 ranks, the low-bandwidth benchmark's model, corpus, optimizer and
worker (``workers/lowbandwidth.py``), ``STEPS`` steps for each run (equal samples):

1. ``Sync`` with the link at 1 Gbit/s: the quality reference (its losses do not depend on the
   link: the same all-reduces, only slower).
2. ``Sync`` with the link at 100 Mbit/s for ``PROBE_STEPS`` steps: its training seconds per
   step at 100 Mbit/s (every step sends the same bytes, so the rate is steady). Its time to
   a loss at 100 Mbit/s is that rate times the steps the reference took to reach it: a whole
   run at 100 Mbit/s would take about 45 minutes here.
3. ``DiLoCo(inner_steps=H)`` at 100 Mbit/s, measured whole.

Reported: both curves, the final losses and their ratio (goal: DiLoCo within 2 % of Sync's),
Sync's final loss as the target, and the training seconds each takes to first reach it at
100 Mbit/s (goal: DiLoCo in ≤ 0.3 × Sync's time). ``--quick``: the tiny model, a few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import md_table, pyplot, run_mpi, save_figure, write_json
from .lowbandwidth import HOSTS, QUALITY_GOAL, RANKS_PER_HOST, TIME_GOAL, to_target, worker_args

__all__ = ["NAME", "run", "summary_rows", "markdown"]

NAME = "convergence"
WORKER = "lowbandwidth"
STEPS = {False: {"steps": 2000, "eval_every": 100, "probe_steps": 100},
         True: {"steps": 8, "eval_every": 4, "probe_steps": 4}}
INNER_STEPS = {False: 50, True: 4}
TIMEOUT_S = {False: 1800, True: 180}


def _train(hosts: Any, rate: str, args: list[str], steps: int, eval_every: int, quick: bool) -> dict[str, Any]:
    hosts.set_link_rate(rate)
    return run_mpi(WORKER, HOSTS * RANKS_PER_HOST, [*args, *worker_args(steps, eval_every, quick)],
                   timeout=TIMEOUT_S[quick], hosts=hosts).results[0]


def measure(quick: bool, hosts: Any) -> dict[str, Any]:
    cfg, inner = STEPS[quick], INNER_STEPS[quick]
    sync = _train(hosts, "1gbit", ["--strategy", "sync"], cfg["steps"], cfg["eval_every"], quick)
    probe = _train(hosts, "100mbit", ["--strategy", "sync"], cfg["probe_steps"], cfg["probe_steps"], quick)
    diloco = _train(hosts, "100mbit", ["--strategy", "diloco", "--inner-steps", str(inner)], cfg["steps"],
                    cfg["eval_every"], quick)
    target = sync["final_loss"]
    sync_step_s = probe["curve"][-1]["seconds"] / cfg["probe_steps"]
    # the target is Sync's loss after close(), which equals its last point (every rank holds it)
    sync_step = (to_target(sync["curve"], target) or sync["curve"][-1])["step"]
    sync_seconds = sync_step * sync_step_s
    reached = to_target(diloco["curve"], target)
    return {
        "steps": cfg["steps"], "probe_steps": cfg["probe_steps"], "inner_steps": inner,
        "parameters": sync["parameters"], "floor": sync["floor"], "target_loss": target,
        "sync": {"curve": sync["curve"], "final_loss": target, "step_s_100mbit": sync_step_s,
                 "to_target": {"step": sync_step, "seconds": sync_seconds}},
        "sync_probe": {"curve": probe["curve"]},
        "diloco": {"curve": diloco["curve"], "final_loss": diloco["final_loss"],
                   "to_target": reached},
        "final_over_sync": diloco["final_loss"] / target,
        "time_over_sync": None if reached is None else reached["seconds"] / sync_seconds,
    }


def run(out: Path, quick: bool) -> dict[str, Any]:
    from hvdagents.testing import SimulatedHosts, unavailable_reason

    reason = unavailable_reason(shaped=True)
    if reason:
        payload: dict[str, Any] = {"quick": quick, "hosts": HOSTS, "skipped": reason}
    else:
        with SimulatedHosts(HOSTS) as hosts:
            payload = {"quick": quick, "hosts": HOSTS, "ranks_per_host": RANKS_PER_HOST, **measure(quick, hosts)}
    write_json(out, NAME, payload)
    if "skipped" not in payload:
        plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    if "skipped" in payload:
        return []
    d = payload["diloco"]
    rows = [[f"DiLoCo H={payload['inner_steps']} final loss at equal samples ({payload['steps']} steps)",
             "nats (lower is better)", f"{d['final_loss']:.3f}", f"{payload['target_loss']:.3f} Sync",
             f"{payload['final_over_sync']:.3f}"]]
    if payload["time_over_sync"] is not None:
        rows.append([f"Time to Sync's final loss, DiLoCo H={payload['inner_steps']}, 100 Mbit/s",
                     "s (lower is better)", f"{d['to_target']['seconds']:.0f}",
                     f"{payload['sync']['to_target']['seconds']:.0f} Sync", f"{payload['time_over_sync']:.2f}"])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    if "skipped" in payload:
        return f"Skipped: {payload['skipped']}."
    sync, d = payload["sync"], payload["diloco"]
    t = d["to_target"]
    reached = sync["to_target"]
    rows = [
        ["Sync (1 Gbit/s; its seconds at 100 Mbit/s: its measured rate there × steps)", f"{sync['final_loss']:.3f}",
         "1.000", f"{sync['step_s_100mbit']:.3f}", f"{reached['seconds']:.0f} (step {reached['step']})", "1.00"],
        [f"DiLoCo H={payload['inner_steps']} (100 Mbit/s, measured)", f"{d['final_loss']:.3f}",
         f"{payload['final_over_sync']:.3f}", f"{d['curve'][-1]['seconds'] / payload['steps']:.3f}",
         "not reached" if t is None else f"{t['seconds']:.0f} (step {t['step']})",
         "–" if payload["time_over_sync"] is None else f"{payload['time_over_sync']:.2f}"],
    ]
    return (f"{payload['hosts']} simulated hosts × {payload['ranks_per_host']} ranks, the `lowbandwidth` model "
            f"({payload['parameters'] / 1e6:.1f}M parameters, true entropy {payload['floor']:.3f} nats), "
            f"{payload['steps']} steps each (equal samples). Sync's rate at 100 Mbit/s from "
            f"{payload['probe_steps']} steps there. Goals: DiLoCo's final loss within {QUALITY_GOAL:.0%} of "
            f"Sync's, and Sync's final loss ({payload['target_loss']:.3f}) reached in ≤ {TIME_GOAL} × Sync's time "
            "at 100 Mbit/s.\n\n"
            + md_table(["run", "final loss", "/ Sync", "s per step at 100 Mbit/s", "s to Sync's final loss", "/ Sync"],
                       rows) + "\n")


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Held-out loss against steps (equal samples), Sync and DiLoCo."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, run in (("Sync", payload["sync"]), (f"DiLoCo H={payload['inner_steps']}", payload["diloco"])):
        ax.plot([p["step"] for p in run["curve"]], [p["loss"] for p in run["curve"]], label=label)
    ax.axhline(payload["target_loss"], color="k", lw=0.7, ls=":")
    ax.axhline(payload["floor"], color="gray", lw=0.7, ls="--")
    ax.set_xlabel("step (equal samples)")
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
