"""Wrapper overhead: TorchAgent/KerasAgent(Sync) against bare Horovod loops, same MLP, 2 ranks.

Each framework runs one MPI job (``bench/workers/overhead_torch.py``, ``overhead_keras.py``)
in which both loops train their own copy of the same MLP, alternating within every
repetition, so both see the same machine state. The ratio is taken per repetition
(ours / bare steps per second, back to back) and summarised as median and spread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "TARGET_RATIO", "run", "summary_rows", "markdown"]

NAME = "overhead"
RANKS = 2
#: The goal: our steps/s at least this share of the bare loop's.
TARGET_RATIO = 0.98

#: ~10.5M parameters: 1024*2048 + 2*2048*2048 + 2048*10 weights plus biases.
FULL = {"dims": "1024,2048,2048,2048,10", "batch": 32, "warmup": 3,
        "torch": {"steps": 20, "reps": 15}, "keras": {"steps": 10, "reps": 9}}
QUICK = {"dims": "64,128,10", "batch": 16, "warmup": 1,
         "torch": {"steps": 3, "reps": 1}, "keras": {"steps": 3, "reps": 1}}
TIMEOUT_S = {False: 600, True: 120}

#: What each variant is, for the tables.
LABELS = {
    ("torch", "ours"): "TorchAgent(Sync), agent.step()",
    ("torch", "bare"): "horovod.torch.DistributedOptimizer, opt.step()",
    ("keras", "ours"): "KerasAgent(Sync), tf.function step with the agent's optimizer",
    ("keras", "ours_fit"): "KerasAgent(Sync), agent.fit (model.fit + callbacks), rate inside the epoch",
    ("keras", "bare"): "tf.function: tape.gradient, hvd.grouped_allreduce, optimizer.apply",
}


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Run both frameworks' jobs; write ``overhead.json`` and ``overhead.png``; return the payload."""
    settings = QUICK if quick else FULL
    frameworks: dict[str, Any] = {}
    for fw in ("torch", "keras"):
        args = ["--dims", settings["dims"], "--batch", str(settings["batch"]), "--warmup", str(settings["warmup"]),
                "--steps", str(settings[fw]["steps"]), "--reps", str(settings[fw]["reps"])]
        job = run_mpi(f"overhead_{fw}", RANKS, args, timeout=TIMEOUT_S[quick])
        result = job.results[0]
        rates = result["steps_per_s"]
        if "fit_setup_s" in result:
            extra = {"fit_setup_s": spread(result["fit_setup_s"])}
        else:
            extra = {}
        frameworks[fw] = {
            "parameters": result["parameters"],
            "dims": result["dims"],
            "batch_per_rank": result["batch"],
            "steps_per_timing": result["steps"],
            "job_s": job.seconds,
            "steps_per_s_raw": rates,
            "steps_per_s": {name: spread(values) for name, values in rates.items()},
            "ratio_vs_bare": {name: ratio_spread(values, rates["bare"])
                              for name, values in rates.items() if name != "bare"},
            **extra,
        }
    payload = {"ranks": RANKS, "quick": quick, "target_ratio": TARGET_RATIO, "frameworks": frameworks}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: one per (framework, our variant)."""
    rows = []
    for fw, data in payload["frameworks"].items():
        bare = data["steps_per_s"]["bare"]
        for name, ratio in data["ratio_vs_bare"].items():
            label = {"ours": "train step", "ours_fit": "agent.fit"}[name]
            rows.append([
                f"Overhead, {fw} {label} ({data['parameters'] / 1e6:.1f}M-param MLP, {payload['ranks']} ranks)",
                "steps/s (higher is better)", fmt_spread(data["steps_per_s"][name]),
                f"{fmt_spread(bare)} bare Horovod", fmt_spread(ratio),
            ])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    rows = []
    for fw, data in payload["frameworks"].items():
        for name, s in data["steps_per_s"].items():
            ratio = data["ratio_vs_bare"].get(name)
            rows.append([fw, LABELS[(fw, name)], fmt_spread(s), str(s["n"]),
                         fmt_spread(ratio) if ratio else "1 (baseline)"])
    fw0 = next(iter(payload["frameworks"].values()))
    setup = payload["frameworks"].get("keras", {}).get("fit_setup_s")
    note = ""
    if setup:
        note = (f"\n\n`agent.fit`'s rate is timed between the first and last batch end of each call; the rest "
                f"of each `fit` call (Keras' own set-up of data adapter, iterator and callbacks, the same for a "
                f"plain `model.fit`) took {fmt_spread(setup)} s per call here, paid once per `fit`, not per step.")
    return (
        f"MLP {'-'.join(map(str, fw0['dims']))} ({fw0['parameters']:,} parameters), batch {fw0['batch_per_rank']} "
        f"per rank, {payload['ranks']} ranks, SGD with momentum. Ratios are per repetition (the variants run "
        f"back to back in rotating order inside one MPI job); goal: ≥ {payload['target_ratio']}.\n\n"
        + md_table(["framework", "loop", "steps/s median [min–max]", "reps", "ours / bare"], rows)
        + note
    )


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Bars of the per-repetition ratios (median, min–max whiskers) against the 1.0 line."""
    plt = pyplot()
    labels, med, low, high = [], [], [], []
    for fw, data in payload["frameworks"].items():
        for name, r in data["ratio_vs_bare"].items():
            labels.append(f"{fw}\n{'fit' if name == 'ours_fit' else 'step'}")
            med.append(r["median"])
            low.append(r["median"] - r["min"])
            high.append(r["max"] - r["median"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, med, yerr=[low, high], capsize=4, color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(payload["target_ratio"], color="tab:red", lw=0.8, ls="--", label=f"goal {payload['target_ratio']}")
    ax.set_ylabel("steps/s, ours / bare Horovod")
    bottom = min(0.8, min(m - lo for m, lo in zip(med, low)) - 0.02)
    ax.set_ylim(bottom, max(1.1, max(m + h for m, h in zip(med, high))))
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Wrapper overhead (median, min–max)", fontsize=10)
    return save_figure(fig, path)
