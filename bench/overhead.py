"""Wrapper overhead: TorchAgent/KerasAgent(Sync) against bare Horovod loops, same MLP, 2 ranks.

Each framework and model size runs one MPI job (``bench/workers/overhead_torch.py``,
``overhead_keras.py``) in which every loop trains its own copy of the same MLP, alternating
within each repetition, so all see the same machine state. Two sizes: the ~10M-parameter MLP
of the goal (where a step takes tens of milliseconds), and a small one whose millisecond steps
expose any fixed per-step cost of the wrapper. Ratios are taken per repetition (ours / bare
steps per second, back to back), with the time added per step, ``1/ours - 1/bare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt_spread, md_table, pyplot, ratio_spread, run_mpi, save_figure, spread, write_json

__all__ = ["NAME", "TARGET_RATIO", "run", "summary_rows", "markdown"]

NAME = "overhead"
RANKS = 2
FRAMEWORKS = ("torch", "keras")
#: The goal: our steps/s at least this share of the bare loop's.
TARGET_RATIO = 0.98

#: "large": ~10.5M parameters (1024*2048 + 2*2048*2048 + 2048*10 weights plus biases);
#: "small": ~85k parameters, millisecond steps.
FULL = {
    "large": {"dims": "1024,2048,2048,2048,10", "batch": 32, "warmup": 3,
              "torch": {"steps": 20, "reps": 15}, "keras": {"steps": 10, "reps": 9}},
    "small": {"dims": "64,256,256,10", "batch": 32, "warmup": 10,
              "torch": {"steps": 300, "reps": 9}, "keras": {"steps": 300, "reps": 7}},
}
QUICK = {
    "large": {"dims": "64,128,10", "batch": 16, "warmup": 1,
              "torch": {"steps": 3, "reps": 1}, "keras": {"steps": 3, "reps": 1}},
}
TIMEOUT_S = {False: 600, True: 120}
#: y range of the plot; ratios outside it are drawn on its edge.
_PLOT_RANGE = (0.8, 1.2)

#: What each variant is, for the tables.
LABELS = {
    ("torch", "ours"): "TorchAgent(Sync), agent.step()",
    ("torch", "bare"): "horovod.torch.DistributedOptimizer, opt.step()",
    ("torch", "ddp"): "torch DistributedDataParallel (gloo), opt.step()",
    ("keras", "ours"): "KerasAgent(Sync), tf.function step with the agent's optimizer",
    ("keras", "ours_fit"): "KerasAgent(Sync), agent.fit, rate inside the epoch",
    ("keras", "model_fit"): "Keras model.fit on the agent's model, no agent callbacks",
    ("keras", "bare"): "tf.function: tape.gradient, hvd.grouped_allreduce, optimizer.apply",
}


def _framework_result(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    rates = result["steps_per_s"]
    bare = rates["bare"]
    data = {
        "parameters": result["parameters"],
        "dims": result["dims"],
        "batch_per_rank": result["batch"],
        "steps_per_timing": result["steps"],
        "job_s": seconds,
        "steps_per_s_raw": rates,
        "steps_per_s": {name: spread(values) for name, values in rates.items()},
        "ratio_vs_bare": {name: ratio_spread(values, bare) for name, values in rates.items() if name != "bare"},
        # signed: noise can make it negative
        "added_us_per_step": {name: spread([1e6 / a - 1e6 / b for a, b in zip(values, bare)])
                              for name, values in rates.items() if name != "bare"},
    }
    if "ddp" in rates:
        data["ours_vs_ddp"] = ratio_spread(rates["ours"], rates["ddp"])
    if "fit_setup_s" in result:
        data["fit_setup_s"] = {name: spread(values) for name, values in result["fit_setup_s"].items()}
        data["agent_fit_over_model_fit"] = ratio_spread(rates["ours_fit"], rates["model_fit"])
    return data


def run(out: Path, quick: bool) -> dict[str, Any]:
    """Run every (size, framework) job; write ``overhead.json`` and ``overhead.png``; return the payload."""
    configs = QUICK if quick else FULL
    models: dict[str, Any] = {}
    for size, settings in configs.items():
        models[size] = {}
        for fw in FRAMEWORKS:
            args = ["--dims", settings["dims"], "--batch", str(settings["batch"]),
                    "--warmup", str(settings["warmup"]),
                    "--steps", str(settings[fw]["steps"]), "--reps", str(settings[fw]["reps"])]
            job = run_mpi(f"overhead_{fw}", RANKS, args, timeout=TIMEOUT_S[quick])
            models[size][fw] = _framework_result(job.results[0], job.seconds)
    payload = {"ranks": RANKS, "quick": quick, "target_ratio": TARGET_RATIO, "models": models}
    write_json(out, NAME, payload)
    plot(payload, out / f"{NAME}.png")
    return payload


def summary_rows(payload: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table: the large model, one row per (framework, our variant)."""
    rows = []
    for fw, data in payload["models"]["large"].items():
        bare = data["steps_per_s"]["bare"]
        for name, ratio in data["ratio_vs_bare"].items():
            if name == "model_fit":
                continue
            label = {"ours": "train step", "ours_fit": "agent.fit"}[name]
            rows.append([
                f"Overhead, {fw} {label} ({data['parameters'] / 1e6:.1f}M-param MLP, {payload['ranks']} ranks)",
                "steps/s (higher is better)", fmt_spread(data["steps_per_s"][name]),
                f"{fmt_spread(bare)} bare Horovod", fmt_spread(ratio),
            ])
    for frameworks in payload["models"].values():
        data = frameworks.get("torch", {})
        if "ours_vs_ddp" in data:
            rows.append([
                f"TorchAgent(Sync) vs PyTorch DDP (gloo), {data['parameters'] / 1e6:.2g}M-param MLP, "
                f"{payload['ranks']} ranks", "steps/s (higher is better)", fmt_spread(data["steps_per_s"]["ours"]),
                f"{fmt_spread(data['steps_per_s']['ddp'])} DDP", fmt_spread(data["ours_vs_ddp"]),
            ])
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The detail section of RESULTS.md."""
    rows = []
    for frameworks in payload["models"].values():
        for fw, data in frameworks.items():
            model = f"{data['parameters']:,} ({'-'.join(map(str, data['dims']))})"
            for name, s in data["steps_per_s"].items():
                ratio = data["ratio_vs_bare"].get(name)
                added = data["added_us_per_step"].get(name)
                rows.append([model, fw, LABELS[(fw, name)], fmt_spread(s), str(s["n"]),
                             fmt_spread(ratio) if ratio else "1 (baseline)",
                             f"{added['median']:+.0f} [{added['min']:+.0f}, {added['max']:+.0f}]" if added else ""])
    text = (
        f"Batch 32 per rank (16 in a quick run), {payload['ranks']} ranks, SGD with momentum. Every loop trains its "
        "own copy of the model; the variants run back to back in rotating order inside one MPI job per model "
        f"and framework, and ratios are per repetition. Goal: ≥ {payload['target_ratio']}. *Added µs/step* is "
        "1/ours − 1/bare per repetition (signed: noise goes both ways).\n\n"
        + md_table(["parameters", "framework", "loop", "steps/s median [min–max]", "reps", "ours / bare",
                    "added µs/step"], rows)
    )
    keras_large = payload["models"]["large"].get("keras", {})
    if "fit_setup_s" in keras_large:
        text += (
            "\n\n`fit` rates are timed between the first and the last batch end of each call: the steady state "
            "inside an epoch. The rest of each call is Keras' set-up (data adapter, iterator, callbacks), "
            f"paid once per `fit`: {fmt_spread(keras_large['fit_setup_s']['ours_fit'])} s for `agent.fit`, "
            f"{fmt_spread(keras_large['fit_setup_s']['model_fit'])} s for a plain `model.fit` "
            f"({keras_large['parameters']:,}-parameter model). "
            "`agent.fit` / `model.fit` (what the agent's callbacks add to Keras' loop): "
            + "; ".join(f"{size} model {fmt_spread(m['keras']['agent_fit_over_model_fit'])}"
                        for size, m in payload["models"].items() if "keras" in m) + "."
        )
    return text


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Every repetition's ratio as a dot, the median as a bar, against the 1.0 line and the goal.

    Ratios outside the plotted range (a repetition disturbed by other load) sit on its edge as
    triangles, so one outlier does not squash the scale.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = []
    entries = [(size, fw, name) for size, frameworks in payload["models"].items()
               for fw, data in frameworks.items() for name in data["ratio_vs_bare"]]
    for x, (size, fw, name) in enumerate(entries):
        data = payload["models"][size][fw]
        raw = data["steps_per_s_raw"]
        ratios = [a / b for a, b in zip(raw[name], raw["bare"])]
        variant = name.replace("ours_", "agent.").replace("model_", "model.").replace("ours", "step")
        labels.append(f"{fw} {size}\n{variant}")
        ax.bar(x, data["ratio_vs_bare"][name]["median"], 0.6, color="tab:blue", alpha=0.35)
        for i, r in enumerate(ratios):
            jitter = (i / max(len(ratios) - 1, 1) - 0.5) * 0.4
            clipped = min(max(r, _PLOT_RANGE[0]), _PLOT_RANGE[1])
            marker = "o" if clipped == r else ("v" if r < clipped else "^")
            ax.plot(x + jitter, clipped, marker, color="tab:blue", markersize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(payload["target_ratio"], color="tab:red", lw=0.8, ls="--", label=f"goal {payload['target_ratio']}")
    ax.set_ylim(*_PLOT_RANGE)
    ax.set_ylabel("steps/s, ours / bare Horovod")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Wrapper overhead: per-repetition ratios (dots), median (bar)", fontsize=10)
    return save_figure(fig, path)
