"""Straggler: time to a fixed test loss on digits with one rank at half speed, per strategy.

One 4-rank MPI job (``--quick``: 2 ranks) (``bench/workers/straggler.py``) trains a fresh TorchAgent for every
(strategy, straggler) pair of every repetition, in rotating order, and records when rank 0's
model first reaches ``target_loss`` on the held-out digits. Every step includes a simulated
accelerator time (a sleep: 4 ranks share 2 cores here, and real compute would contend for
them). The straggler (the last rank) sleeps before each step as long as its previous step's
compute took, so it runs at about half speed. Ratios are taken per repetition against Sync in
the same condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt_spread, md_table, pyplot, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "STRATEGIES", "run", "summary_rows", "markdown"]

NAME = "straggler"
#: ``--quick``: 2 ranks (the second the straggler). Its runs reach the quick target in under a
#: second, so the job is mostly start-up and agent set-up, which 4 processes on 2 cores double.
RANKS = {False: 4, True: 2}
STRATEGIES = ("sync", "downpour", "downpour-staleness", "easgd", "gossip")
FULL = {"target_loss": 0.1, "budget": 20.0, "reps": 5, "device_ms": 10.0}
QUICK = {"target_loss": 1.0, "budget": 5.0, "reps": 1, "device_ms": 1.0}
TIMEOUT_S = {False: 900, True: 120}
CONDITIONS = {False: "balanced", True: "straggler ×2"}


def _group(runs: list[dict[str, Any]], strategy: str, straggler: bool) -> list[dict[str, Any]]:
    return sorted((r for r in runs if r["strategy"] == strategy and r["straggler"] == straggler),
                  key=lambda r: r["rep"])


def _summarise(runs: list[dict[str, Any]], strategies: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for straggler in (False, True):
        cond: dict[str, Any] = {}
        base = {r["rep"]: r["reached_s"] for r in _group(runs, "sync", straggler)}
        for s in strategies:
            group = _group(runs, s, straggler)
            reached = [r["reached_s"] for r in group if r["reached_s"] is not None]
            paired = [r["reached_s"] / base[r["rep"]] for r in group
                      if r["reached_s"] is not None and base.get(r["rep"]) is not None]
            cond[s] = {
                "reached": len(reached),
                "runs": len(group),
                "time_to_target_s": spread(reached) if reached else None,
                "time_over_sync": spread(paired) if paired else None,
                "final_loss": spread([r["final_loss"] for r in group]),
                "steps_per_rank_median_run": group[len(group) // 2]["steps"] if group else [],
            }
        out[CONDITIONS[straggler]] = cond
    return out


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Run the straggler job; write ``straggler.json`` and ``straggler.png``; return the payload."""
    settings = QUICK if quick else FULL
    args = ["--strategies", ",".join(STRATEGIES), "--target-loss", str(settings["target_loss"]),
            "--budget", str(settings["budget"]), "--reps", str(settings["reps"]),
            "--device-ms", str(settings["device_ms"])]
    job = run_mpi("straggler", RANKS[quick], args, timeout=TIMEOUT_S[quick])
    result = job.results[0]
    payload = {"ranks": result["ranks"], "quick": quick, "job_s": job.seconds, "target_loss": result["target_loss"],
               "budget_s": result["budget_s"], "settings": result["settings"],
               "summary": _summarise(result["runs"], list(STRATEGIES)), "runs": result["runs"]}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def _time(entry: dict[str, Any], key: str = "time_to_target_s") -> str:
    if entry[key] is None:
        return "not reached"
    missed = entry["runs"] - entry["reached"]
    return fmt_spread(entry[key]) + (f" ({missed} of {entry['runs']} not reached)" if missed else "")


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: every asynchronous strategy against Sync, per condition."""
    rows = []
    for cond, entries in payload["summary"].items():
        for s, e in entries.items():
            if s == "sync":
                continue
            rows.append([f"Straggler, {payload['ranks']} ranks, {cond}: {s}",
                         f"s to test loss ≤ {payload['target_loss']} (lower is better)", _time(e),
                         f"{_time(entries['sync'])} Sync", _time(e, "time_over_sync")])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    rows = []
    for cond, entries in payload["summary"].items():
        for s, e in entries.items():
            rows.append([cond, s, _time(e), _time(e, "time_over_sync") if s != "sync" else "1",
                         fmt_spread(e["final_loss"]), str(e["steps_per_rank_median_run"])])
    st = payload["settings"]
    return (
        f"Digits (scikit-learn), MLP 64-{st['hidden']}-{st['hidden']}-10, batch {st['batch']} per rank, SGD lr "
        f"{st['lr']} momentum {st['momentum']}; {payload['ranks']} ranks on this machine's cores. Downpour: "
        f"period {st['period']}, normalised (*downpour-staleness*: each push also divided by its staleness τ, "
        "Zhang et al. 2016); EASGD: α {st['alpha']}, period {st['period']}; Gossip: period 1, "
        f"random peer. Every step includes {st['device_ms']:g} ms of simulated accelerator time (a sleep: the "
        f"{payload['ranks']} ranks share this machine's cores, and real compute would contend for them). Time until "
        f"rank 0's model first has test loss ≤ {payload['target_loss']} (evaluated every 5 steps), budget "
        f"{payload['budget_s']:.0f} s. The straggler (last rank) sleeps as long as its compute before every step, "
        "so it runs at about half speed. *Steps per rank* are those of the median run, rank 0 first.\n\n"
        + md_table(["condition", "strategy", "s to target", "time / Sync", "final consensus loss",
                    "steps per rank"], rows)
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Test loss against time for the first repetition, balanced and with the straggler."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, straggler in zip(axes, (False, True)):
        for s in STRATEGIES:
            group = _group(payload["runs"], s, straggler)
            if group and group[0]["curve"]:
                t, loss = zip(*group[0]["curve"])
                ax.plot(t, loss, label=s)
        ax.axhline(payload["target_loss"], color="black", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_title(f"{CONDITIONS[straggler]}, {payload['ranks']} ranks", fontsize=10)
    axes[0].set_ylabel("rank 0 test loss")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
