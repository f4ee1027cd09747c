"""Smoke tests of ``python -m bench``: every benchmark runs in ``--quick`` mode (tiny sizes,
one repetition, real MPI jobs) and writes well-formed results. No timing thresholds: the
numbers of a quick run on a shared 2-core machine mean nothing, only their shape does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Hard limit for the whole quick run (each MPI job inside has its own, shorter one); a hang
#: guard, not a speed bar: beside other jobs on this 2-core machine a quick run took over 300 s.
QUICK_RUN_TIMEOUT = 600
NAMES = ["overhead", "allreduce", "cycle_time", "crosshost", "store", "straggler", "scaling", "memory", "longrun",
         "lowbandwidth", "convergence", "sharded"]
#: Keys every benchmark's JSON must have, beside "benchmark" and "machine".
REQUIRED = {
    "overhead": ["ranks", "target_ratio", "models"],
    "allreduce": ["ranks", "sizes", "small_tensors", "latency", "fit"],
    "store": ["n", "vector_bytes", "worlds"],
    "straggler": ["ranks", "target_loss", "summary", "runs"],
    "scaling": ["nodes", "links_gbit", "alpha", "seconds"],
    "memory": ["n", "ranks", "model_mib", "strategies"],
    "longrun": ["ranks", "epochs", "runs", "bars"],
    "cycle_time": ["cycle_times_ms", "worlds"],
    "crosshost": ["hosts"],
    "lowbandwidth": ["hosts", "rates"],
    "convergence": ["hosts"],
    "sharded": ["memory", "speed"],
}
MACHINE_KEYS = ["cpu", "cores", "mpi", "horovod", "torch", "tensorflow", "keras", "mpi4py", "python", "date_utc"]
SPREAD_KEYS = ("median", "min", "max", "q1", "q3")
#: Keys of differences, which noise can make negative.
SIGNED = {"added_us_per_step"}
#: Keys of shares (0 to 1), which are 0 when nothing was counted.
SHARES = {"stalled_share"}
#: Most that Sync and LocalSGD may add to the peak of training without an agent: the
#: checkpoint read back (memory-mapped: model and momentum, counted while resident) and
#: Horovod's own buffers.
SYNC_ADDED_MODELS, SYNC_ADDED_MIB = 2.0, 128


def _bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    # env=os.environ explicitly: once a test has initialised MPI in this process (a singleton),
    # Open MPI has setenv()'d its own OMPI_*/PMIX_* variables, which a child started with the
    # inherited environment would pass on to mpirun, and mpirun then exits 1 without a word.
    return subprocess.run([sys.executable, "-m", "bench", "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=QUICK_RUN_TIMEOUT, env=dict(os.environ))


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = _bench(out, "--quick")
    assert proc.returncode == 0, f"python -m bench --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out


def _numbers(value, where="$"):
    """Every (path, number) in a JSON value, except under SIGNED keys; booleans are not numbers."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in SIGNED:
                yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


def _spreads(value, skip=SIGNED | SHARES):
    """Every median/min/max summary in a JSON value, except under ``skip`` keys."""
    if isinstance(value, dict):
        if "median" in value:
            yield value
        for k, v in value.items():
            if k not in skip:
                yield from _spreads(v, skip)
    elif isinstance(value, list):
        for v in value:
            yield from _spreads(v, skip)


def _shares(value):
    """Every summary under a SHARES key."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from (_spreads(v, skip=set()) if k in SHARES else _shares(v))
    elif isinstance(value, list):
        for v in value:
            yield from _shares(v)


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_well_formed_json(quick_out, name):
    data = json.loads((quick_out / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert data["quick"] is True
    for key in REQUIRED[name]:
        assert key in data, f"{name}.json lacks {key!r}"
    for key in MACHINE_KEYS:
        assert data["machine"].get(key), f"{name}.json machine record lacks {key!r}"
    for where, number in _numbers(data):
        assert math.isfinite(number), f"{name}.json {where} = {number}"
        assert number >= 0, f"{name}.json {where} = {number}"
    summaries = list(_spreads(data))
    if name == "scaling":  # a model, not a measurement: its numbers are the predicted times
        assert all(t > 0 for curves in data["seconds"].values() for ts in curves.values() for t in ts)
    elif name == "memory":  # one job per strategy: peaks, not spreads over repetitions
        assert all(v > 0 for s in data["strategies"] for v in s["peak_mib"].values())
    elif name == "sharded":  # one job per variant and world size: counts and peaks
        assert all(r["added_mib"] > 0 for r in data["memory"]), data["memory"]
    elif name == "lowbandwidth":  # curves, checked in test_quick_lowbandwidth_run_...
        assert "skipped" in data or data["rates"], data
    elif name == "convergence":  # curves, checked in test_quick_convergence_run_...
        assert "skipped" in data or data["diloco"]["curve"], data
    elif name == "longrun":  # one job per run: accuracy curves
        assert all(0 <= a <= 1 for r in data["runs"] for a in r["accuracy"])
        assert all(0 < r["final"] <= 1 for r in data["runs"])  # the consensus model was scored
    else:
        assert summaries, f"{name}.json has no median/min/max summaries"
    for s in summaries:
        assert all(s[k] > 0 for k in SPREAD_KEYS), s
        assert s["min"] <= s["median"] <= s["max"], s
    for s in _shares(data):
        assert 0 <= s["min"] <= s["median"] <= s["max"] <= 1, s
    assert (quick_out / f"{name}.png").stat().st_size > 0


def test_quick_run_measures_what_it_compares(quick_out):
    overhead = json.loads((quick_out / "overhead.json").read_text())
    large = overhead["models"]["large"]
    assert set(large) == {"torch", "keras"}
    assert set(large["torch"]["ratio_vs_bare"]) == {"ours", "ddp"}  # DDP (gloo) on the same loop
    assert large["torch"]["ours_vs_ddp"]["median"] > 0
    assert set(large["keras"]["ratio_vs_bare"]) == {"ours", "ours_fit", "model_fit"}
    for data in large.values():
        for added in data["added_us_per_step"].values():
            assert all(math.isfinite(added[k]) for k in SPREAD_KEYS), added
    allreduce = json.loads((quick_out / "allreduce.json").read_text())
    assert {"hvd", "mpi", "mpi_beside_hvd"} <= set(allreduce["sizes"][0]["bus_bandwidth_Bps"])
    assert set(allreduce["small_tensors"]["round_s"]) == {"hvd_grouped", "hvd_async", "mpi_each", "mpi_packed"}
    latency = allreduce["latency"]
    assert latency["bytes"] == 4096 and latency["median_s"]["hvd"]["median"] > latency["median_s"]["mpi"]["median"] > 0
    assert all(0 <= s["max"] <= 1 for s in latency["stalled_share"].values())
    store = json.loads((quick_out / "store.json").read_text())
    assert {"push", "pull", "push_pull", "memcpy", "server"} <= set(store["worlds"][0]["ops_per_s"])
    straggler = json.loads((quick_out / "straggler.json").read_text())
    assert set(straggler["summary"]) == {"balanced", "straggler ×2"}
    for cond in straggler["summary"].values():
        assert set(cond) == {"sync", "downpour", "downpour-staleness", "easgd", "gossip"}
    for run in straggler["runs"]:
        assert run["reached_s"] is None or run["reached_s"] > 0, run
        assert len(run["steps"]) == straggler["ranks"]
    scaling = json.loads((quick_out / "scaling.json").read_text())
    assert scaling["alpha"]["source"].startswith("fitted"), "scaling must use the all-reduce fit of the same run"


def test_quick_memory_run_sees_the_model_copies_each_strategy_holds(quick_out):
    """Differences between phases of the same process, in model sizes (122 MiB in --quick):
    the baseline must have trained (model, gradient and momentum resident), the asynchronous
    strategies must hold at least one more copy of the model (the pulled centre or neighbour
    model, their window), and Sync and LocalSGD no copy of their own beyond the checkpoint's read."""
    memory = json.loads((quick_out / "memory.json").read_text())
    assert [s["strategy"] for s in memory["strategies"]] == ["sync", "localsgd", "downpour", "easgd", "gossip"]
    model = memory["model_mib"]
    assert model >= 100, "--quick's model must stand above the allocator's noise"
    for s in memory["strategies"]:
        peak = s["peak_mib"]
        assert peak["baseline"] - peak["start"] >= 2.5 * model, s  # 3 model sizes trained without an agent
        added = max(peak[p] for p in ("construct", "train", "checkpoint", "close")) - peak["baseline"]
        if s["strategy"] in ("sync", "localsgd"):
            assert added <= SYNC_ADDED_MODELS * model + SYNC_ADDED_MIB, s
        else:
            assert added >= model, s


def test_quick_crosshost_run_spans_two_hosts(quick_out):
    crosshost = json.loads((quick_out / "crosshost.json").read_text())
    if "skipped" in crosshost:  # not root, or no iproute2: said, not passed over
        pytest.skip(f"the crosshost benchmark was skipped: {crosshost['skipped']}")
    assert crosshost["allreduce"]["ranks"] == 2 and crosshost["one_sided"]["nodes"] == 2
    store = crosshost["store"]
    assert store["exact"] and all(r["through_relay"] for r in store["runs"])
    assert store["push_gbs"]["median"] > 0 and store["two_sided_gbs"]["median"] > 0


def test_quick_lowbandwidth_run_trains_every_configuration_on_a_shaped_link(quick_out):
    """Every configuration trained across the shaped hosts and was scored; DiLoCo, which
    all-reduces once per H steps instead of every step, sent fewer bytes across the hosts than
    Sync (a count, not a time)."""
    low = json.loads((quick_out / "lowbandwidth.json").read_text())
    if "skipped" in low:  # not root, or no iproute2/tc: said, not passed over
        pytest.skip(f"the lowbandwidth benchmark was skipped: {low['skipped']}")
    (at,) = low["rates"]
    assert at["rate"] == "100mbit"
    runs = {r["label"]: r for r in at["runs"]}
    assert all("failed" not in r for r in runs.values()), [r.get("failed") for r in runs.values()]
    for r in runs.values():
        assert [p["step"] for p in r["curve"]] == [6, 12] and r["ranks"] == 4, r
        assert r["floor"] < r["final_loss"] < 2 * math.log(64), r  # scored, finite, not diverged
        assert all(p["sent"] > 0 for p in r["curve"]), r
    sync, diloco = runs["Sync"], runs["DiLoCo H=3"]
    assert diloco["curve"][-1]["sent"] < 0.6 * sync["curve"][-1]["sent"], (diloco["curve"], sync["curve"])


def test_quick_convergence_run_compares_diloco_with_sync_at_equal_samples(quick_out):
    """Sync (1 Gbit/s) and DiLoCo (100 Mbit/s) trained the same steps across the shaped hosts
    and were scored; the target is Sync's final loss, Sync's seconds at 100 Mbit/s are its
    probed rate there times the steps it took, DiLoCo's are its own first point at or below
    the target, and the ratios are what they divide."""
    conv = json.loads((quick_out / "convergence.json").read_text())
    if "skipped" in conv:
        pytest.skip(f"the convergence benchmark was skipped: {conv['skipped']}")
    sync, diloco = conv["sync"], conv["diloco"]
    for run in (sync, diloco):
        assert [p["step"] for p in run["curve"]] == [4, 8], run
        assert conv["floor"] < run["final_loss"] < 2 * math.log(64), run
    assert [p["step"] for p in conv["sync_probe"]["curve"]] == [conv["probe_steps"]]
    assert conv["target_loss"] == sync["final_loss"] == sync["curve"][-1]["loss"], conv
    assert sync["step_s_100mbit"] > 0
    assert sync["to_target"]["seconds"] == sync["to_target"]["step"] * sync["step_s_100mbit"], sync
    assert conv["final_over_sync"] == diloco["final_loss"] / sync["final_loss"]
    reached = diloco["to_target"]
    if reached is None:
        assert all(p["loss"] > conv["target_loss"] for p in diloco["curve"]) and conv["time_over_sync"] is None
    else:
        point = next(p for p in diloco["curve"] if p["step"] == reached["step"])
        assert point["loss"] <= conv["target_loss"] and point["seconds"] == reached["seconds"], (point, reached)
        assert conv["time_over_sync"] == reached["seconds"] / sync["to_target"]["seconds"]


def test_quick_sharded_run_holds_a_1_over_n_share_of_the_optimizer_state(quick_out):
    """Counts, not times: under ZeRO (both stages) each of the 2 ranks holds half of Sync's Adam
    state (to the few bytes of Adam's step counters); ZeroRedundancyOptimizer's ranks (whole
    parameters each) and ours hold together what Sync holds on one rank; every variant was timed."""
    sharded = json.loads((quick_out / "sharded.json").read_text())
    rows = {r["variant"]: r for r in sharded["memory"]}
    assert set(rows) == {"sync", "zero1", "zero2", "zero_ddp"} and all(r["ranks"] == 2 for r in rows.values())
    sync = rows["sync"]["state_bytes"]
    assert sync[0] == sync[1] > 0, sync  # every rank holds the whole state
    for variant in ("zero1", "zero2", "zero_ddp"):
        held = rows[variant]["state_bytes"]
        assert abs(sum(held) - sync[0]) < 0.001 * sync[0], (variant, held, sync)
        if variant != "zero_ddp":
            assert abs(max(held) / sync[0] - 0.5) < 0.001, (variant, held, sync)
    (speed,) = sharded["speed"]
    assert all(speed["steps_per_s"][v]["median"] > 0 for v in rows)


def test_results_markdown_is_a_table_with_every_benchmark(quick_out):
    text = (quick_out / "RESULTS.md").read_text()
    assert text.startswith("# hvdagents benchmarks")
    assert "| benchmark | metric | ours | baseline | ours / baseline |" in text
    for name in NAMES:
        assert f"]({name}.png)" in text


def test_only_runs_one_benchmark_and_scaling_alone_assumes_alpha(tmp_path):
    proc = _bench(tmp_path, "--quick", "--only", "scaling")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["scaling.json"]
    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["alpha"]["source"].startswith("assumed")
    assert "| benchmark | metric |" in proc.stdout


def test_scaling_formulas():
    from bench.scaling import ring_time, server_time, store_time

    n, alpha, beta = 1e8, 1e-6, 1e-9
    assert ring_time(2, n, alpha, beta) == pytest.approx(2 * alpha + n * beta)
    assert store_time(1024, n, alpha, beta) == pytest.approx(ring_time(1024, n, alpha, beta))
    assert server_time(1024, n, alpha, beta) == pytest.approx(2 * alpha + 1024 * n * beta)
