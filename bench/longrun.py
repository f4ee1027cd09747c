"""Long runs of the asynchronous strategies: do they stay trained?

Every asynchronous strategy × framework trains ``examples/async_digits.py`` with its
defaults on 4 ranks (``--quick``: 2) for ``epochs`` epochs, for several seeds (one MPI job each). The bar:
the consensus model that ``close()`` returns scores ≥ 0.93 test accuracy, and rank 0's own
model never scores below 0.9 after epoch 20 (asynchrony adds implicit momentum, Mitliagkas
et al. 2016: a run can be fine for 100 epochs and collapse later).
Downpour also runs with ``--staleness-aware``, each push scaled by 1/τ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ._common import md_table, pyplot, run_mpi, save_figure, write_json

__all__ = ["NAME", "run", "summary_rows", "markdown", "FINAL_BAR", "FLOOR_BAR", "FLOOR_FROM_EPOCH"]

NAME = "longrun"
FINAL_BAR, FLOOR_BAR, FLOOR_FROM_EPOCH = 0.93, 0.90, 20
VARIANTS = {"downpour": [], "downpour-staleness": ["--staleness-aware"], "easgd": [], "gossip": []}
FULL = {"epochs": 200, "seeds": [0, 1, 2], "frameworks": ["torch", "keras"], "variants": list(VARIANTS)}
QUICK = {"epochs": 2, "seeds": [0], "frameworks": ["torch", "keras"], "variants": ["downpour"]}
#: ``--quick``: 2 ranks, each job's start-up (the interpreter, PyTorch or TensorFlow, Horovod) on half
#: as many processes sharing the cores; the smoke needs a run of an asynchronous strategy, not 4 ranks.
RANKS = {False: 4, True: 2}
TIMEOUT_S = {False: 900, True: 120}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """One job per variant × framework × seed; write ``longrun.json`` and ``longrun.png``."""
    settings = QUICK if quick else FULL
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for framework in settings["frameworks"]:
            for variant in settings["variants"]:
                for seed in settings["seeds"]:
                    args = [f"{tmp}/{framework}-{variant}-{seed}.csv", "--framework", framework,
                            "--strategy", variant.split("-")[0], "--epochs", str(settings["epochs"]),
                            "--seed", str(seed), *VARIANTS[variant]]
                    job = run_mpi("digits_run", RANKS[quick], args, timeout=TIMEOUT_S[quick])
                    accuracy, final = job.results[0]["accuracy"], job.results[0]["consensus"]
                    later = accuracy[FLOOR_FROM_EPOCH:] or accuracy[-1:]
                    runs.append({"framework": framework, "variant": variant, "seed": seed, "job_s": job.seconds,
                                 "final": final, "final_local": accuracy[-1], "floor_after_20": min(later),
                                 "accuracy": accuracy, "passes": final >= FINAL_BAR and min(later) >= FLOOR_BAR})
    payload = {"quick": quick, "ranks": RANKS[quick], "epochs": settings["epochs"], "runs": runs,
               "bars": {"final": FINAL_BAR, "floor": FLOOR_BAR, "floor_from_epoch": FLOOR_FROM_EPOCH}}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def _groups(payload: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in payload["runs"]:
        groups.setdefault((r["variant"], r["framework"]), []).append(r)
    return groups


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """One row per variant × framework: the worst final accuracy over seeds against the bar."""
    rows = []
    for (variant, framework), runs in _groups(payload).items():
        worst = min(r["final"] for r in runs)
        rows.append([f"{variant}, {framework}, {payload['epochs']} epochs, {len(runs)} seeds",
                     "worst consensus test accuracy", f"{worst:.3f}", f"{FINAL_BAR} (bar)", f"{worst / FINAL_BAR:.2f}"])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md: every run's final accuracy and floor after epoch 20."""
    rows = [[r["variant"], r["framework"], str(r["seed"]), f"{r['final']:.3f}", f"{r['final_local']:.3f}",
             f"{r['floor_after_20']:.3f}", "yes" if r["passes"] else "**no**", f"{r['job_s']:.0f}"]
            for r in payload["runs"]]
    return (
        f"`examples/async_digits.py` with its defaults, {payload['ranks']} ranks sharing this machine's cores, "
        f"{payload['epochs']} epochs, no staleness bound. Bar: the consensus model (after `close()`) scores ≥ "
        f"{FINAL_BAR} test accuracy, and rank 0's own model never below {FLOOR_BAR} after epoch "
        f"{FLOOR_FROM_EPOCH} (measured at each epoch's end).\n\n"
        + md_table(["strategy", "framework", "seed", "consensus", "rank 0's model, last epoch",
                    f"rank 0 lowest after epoch {FLOOR_FROM_EPOCH}", "bar met", "job s"], rows)
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Test accuracy per epoch, one panel per framework, one line per run."""
    plt = pyplot()
    frameworks = sorted({r["framework"] for r in payload["runs"]})
    fig, axes = plt.subplots(1, len(frameworks), figsize=(5 * len(frameworks), 3.2), squeeze=False)
    colours = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    for ax, framework in zip(axes[0], frameworks):
        for r in payload["runs"]:
            if r["framework"] == framework:
                ax.plot(range(1, len(r["accuracy"]) + 1), r["accuracy"], color=colours[r["variant"]], lw=0.8,
                        label=r["variant"] if r["seed"] == payload["runs"][0]["seed"] else None)
        ax.axhline(FLOOR_BAR, color="k", lw=0.5, ls="--")
        ax.set_ylim(0.5, 1.0)
        ax.set_title(framework, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    return save_figure(fig, path)
