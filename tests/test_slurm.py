"""The slurm/ templates and srun launches, against a real one-node SLURM (tests/slurm_cluster.py;
the ``slurm`` fixture in conftest.py).

The cluster comes up once per session (about a second once installed; tools/setup_slurm.sh
installs it where we are root on Debian). It is skipped, with the reason, only where SLURM
cannot be installed; a cluster that fails to come up fails the tests with its logs.
Every job is bounded: a job that does not finish in time is cancelled and its test fails.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from mpirun import REPO, SCRIPTS
from slurm_cluster import SlurmCluster

TEMPLATES = REPO / "slurm"
HELLO = SCRIPTS / "slurm_hello.py"
CKPT_LOOP = SCRIPTS / "slurm_ckpt_loop.py"

#: Seconds one small batch job may take from submission to its end.
JOB_TIMEOUT = 120
#: sbatch options that shrink every template to this 2-core, 2-stand-in-GPU node.
SMALL = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10"]


#: Open MPI's --tag-output prefix (horovodrun turns it on): "[1,0]<stdout>:".
_TAG = re.compile(r"^\[\d+,\d+\]<stdout>:")


def _results(text: str) -> list[dict]:
    lines = (_TAG.sub("", line) for line in text.splitlines())
    return [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]


def _submit(
    slurm: SlurmCluster, template: str, name: str, env: dict[str, str], *options: str
) -> tuple[int, Path]:
    out = slurm.root / "jobs" / f"{name}.out"
    out.parent.mkdir(exist_ok=True)
    job = slurm.sbatch(TEMPLATES / template, *SMALL, f"--job-name={name}", f"--output={out}", *options,
                       env={"PYTHON": sys.executable, **env})
    return job, out


def _run_template(
    slurm: SlurmCluster, template: str, name: str, env: dict[str, str]
) -> tuple[str, list[dict]]:
    """Submit, wait (bounded), and return the job's output and its RESULT lines; fail unless COMPLETED."""
    job, out = _submit(slurm, template, name, env)
    state = slurm.wait_done(job, JOB_TIMEOUT)
    text = out.read_text() if out.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}\n{slurm.job(job)}"
    return text, _results(text)


def _assert_world(results: list[dict], size: int, launcher: str, text: str = "") -> None:
    """Ranks 0..size-1, each seeing the same world started by ``launcher``, and an all-reduce."""
    assert sorted(r["rank"] for r in results) == list(range(size)), f"{results}\n{text}"
    assert all(r["size"] == size and r["launcher"] == launcher for r in results), results
    assert all(r["rank_sum"] == size * (size - 1) // 2 for r in results), results


# ---- srun launches ------------------------------------------------------------------------------
def test_srun_with_pmix_is_one_world(slurm):
    result = slurm.run(["srun", "--mpi=pmix", "-n", "2", sys.executable, str(HELLO)], timeout=60)
    results = _results(result.stdout)
    _assert_world(results, 2, "srun", result.output)
    assert sorted(r["local_rank"] for r in results) == [0, 1]


def test_srun_without_pmix_is_refused_with_the_fix(slurm):
    result = slurm.run(["srun", "-n", "2", sys.executable, str(HELLO)], timeout=60, check=False)
    assert result.returncode != 0
    assert "LauncherError" in result.output and "--mpi=pmix" in result.output, result.output


def test_hvdagents_launch_inside_an_allocation_uses_srun(slurm):
    command = ["salloc", "-n", "2", "--time=5", sys.executable, "-m", "hvdagents", "launch", "-np", "2",
               str(HELLO)]
    result = slurm.run(command, timeout=90)
    _assert_world(_results(result.stdout), 2, "srun", result.output)


# ---- the templates ------------------------------------------------------------------------------
def test_single_node_gpus_template(slurm):
    text, results = _run_template(slurm, "single_node_gpus.sbatch", "single",
                                  {"SCRIPT": str(HELLO), "ARGS": "--marker single"})
    _assert_world(results, 2, "srun", text)
    assert all(r["argv"] == ["--marker", "single"] for r in results), results
    # srun --gpus-per-task=1: every task is bound to one GPU of its own
    gpus = [r["gpus"] for r in results]
    assert all(g is not None and len(g.split(",")) == 1 for g in gpus), f"one GPU per task expected: {results}"
    assert len(set(gpus)) == len(gpus), f"tasks share a GPU: {results}"


def test_multi_node_template_checks_the_world_first(slurm):
    text, results = _run_template(slurm, "multi_node.sbatch", "multi",
                                  {"SCRIPT": str(HELLO), "ARGS": "--marker multi", "NET_IF": "lo"})
    assert "MPI sees all 2 ranks" in text, text
    _assert_world(results, 2, "srun", text)


def test_multi_node_template_refuses_an_srun_without_pmix(slurm, tmp_path):
    # A site whose srun lacks PMIx: stand in with a wrapper that drops --mpi=pmix.
    fake = tmp_path / "srun"
    fake.write_text(f'#!/bin/bash\nexec {shutil.which("srun")} "${{@/--mpi=pmix/--mpi=none}}"\n')
    fake.chmod(0o755)
    job, out = _submit(slurm, "multi_node.sbatch", "multi-nopmix",
                       {"SCRIPT": str(HELLO), "NET_IF": "lo", "PATH": f"{tmp_path}:{slurm.env['PATH']}"})
    state = slurm.wait_done(job, JOB_TIMEOUT)
    text = out.read_text()
    assert state == "FAILED", text
    assert "SLURM started 2 tasks but MPI sees a world of" in text, text
    assert not _results(text), "training started although MPI did not see every rank"


def test_mpirun_in_allocation_template(slurm):
    text, results = _run_template(slurm, "mpirun_in_allocation.sbatch", "mpirun",
                                  {"SCRIPT": str(HELLO), "ARGS": "--marker mpirun"})
    assert f"-H {slurm.node}:2" in text, text
    _assert_world(results, 2, "mpirun", text)


def test_horovodrun_in_allocation_template(slurm):
    if shutil.which("horovodrun", path=slurm.env["PATH"]) is None:
        pytest.skip("horovodrun is not installed (Horovod not built yet: tools/setup.sh)")
    text, results = _run_template(slurm, "horovodrun_in_allocation.sbatch", "horovodrun",
                                  {"SCRIPT": str(HELLO), "ARGS": "--marker horovodrun"})
    _assert_world(results, 2, "horovodrun", text)


def test_async_easgd_template_runs_one_sided_mpi(slurm):
    text, results = _run_template(slurm, "async_easgd.sbatch", "easgd",
                                  {"SCRIPT": str(HELLO), "ARGS": "--rma", "FRAMEWORK": "keras"})
    _assert_world(results, 2, "srun", text)
    assert all(r["argv"] == ["--framework", "keras", "--strategy", "easgd"] for r in results), results
    assert [r["rma_total"] for r in results if r["rank"] == 0] == [2], results


# ---- requeue round trip ----------------------------------------------------------------------------
def _wait_for(predicate, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")


# The first run waits at step HOLD_AT for the signal (sent once step 5 is checkpointed), so the
# step training stops at is between the two whatever the machine's pace.
HOLD_AT = 10


def test_requeue_checkpoints_on_usr1_and_resumes(slurm):
    steps = 40
    jobs = slurm.root / "jobs"
    jobs.mkdir(exist_ok=True)
    checkpoint, csv_path = jobs / "requeue.ckpt", jobs / "requeue.csv"
    env = {
        "SCRIPT": str(CKPT_LOOP),
        "CHECKPOINT": str(checkpoint),
        "ARGS": f"--steps {steps} --step-seconds 0.1 --checkpoint-every 5 --hold-at {HOLD_AT} --csv {csv_path}",
    }
    job, out = _submit(slurm, "requeue.sbatch", "requeue", env)

    def output() -> str:
        return out.read_text() if out.exists() else "(no output yet)"

    def checkpointed() -> bool:
        try:
            return json.loads(checkpoint.read_text())["step"] >= 5
        except (OSError, ValueError):
            return False

    try:
        _wait_for(checkpointed, 90, "the first checkpoint", output)
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        _wait_for(lambda: slurm.job(job).get("Restarts") == "1" and slurm.state(job) == "PENDING",
                  60, "the job to be requeued", lambda: f"{slurm.job(job)}\n{output()}")
        # start the rerun now, once the node has finished cleaning up the first run (earlier, 1
        # run in 8 on a loaded machine was refused: "Job credential revoked")
        _wait_for(slurm.nodes_idle, 60, "the node to finish the first run", lambda: slurm.diagnostics())
        slurm.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
    except BaseException:
        slurm.run(["scancel", "--full", str(job)], check=False)
        raise
    state = slurm.wait_done(job, JOB_TIMEOUT)
    text = output()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}\n{slurm.job(job)}\n{slurm.diagnostics()}"
    assert "got USR1" in text and "requeueing" in text, text

    events = _results(text)
    starts = [e for e in events if e["event"] == "start"]
    preempted = [e for e in events if e["event"] == "preempted"]
    done = [e for e in events if e["event"] == "done"]
    assert len(starts) == 2 and len(preempted) == 1 and len(done) == 1, text
    stop_step = preempted[0]["step"]
    assert 5 <= stop_step <= HOLD_AT, f"USR1 did not interrupt training: {preempted}"
    assert preempted[0]["signal"] == 10 and preempted[0]["requested_here"], preempted
    # The rerun resumed exactly where the checkpoint was taken, and the sum matches an
    # uninterrupted run: no step was repeated or skipped.
    assert starts[0] == {"event": "start", "step": 0, "total": 0, "resumed": False, "size": 2}
    assert starts[1]["resumed"] and starts[1]["step"] == stop_step, starts
    assert done[0]["step"] == steps and done[0]["total"] == 2 * steps * (steps - 1) // 2, done
    # MetricsLog appended after the resume: one header, every step once, in order.
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "step,loss,accuracy"
    assert [int(row.split(",")[0]) for row in rows[1:]] == list(range(1, steps + 1))


# ---- the real examples, once they exist ------------------------------------------------------------
@pytest.mark.parametrize(
    "template, script",
    [
        ("single_node_gpus.sbatch", "examples/torch_digits.py"),
        ("async_easgd.sbatch", "examples/async_digits.py"),
    ],
)
def test_template_trains_its_default_example(slurm, template, script):
    """Each template runs its default script (SCRIPT unset) to a trained model."""
    if not (REPO / script).exists():
        pytest.skip(f"{script} is not written yet")
    name = template.split(".")[0]
    csv_path = slurm.root / "jobs" / f"{name}.csv"
    text, _ = _run_template(slurm, template, name, {"ARGS": f"--epochs 3 --seed 0 --csv {csv_path}"})
    match = re.search(r"final test accuracy: ([0-9.]+)", text)
    assert match, text
    assert float(match.group(1)) > 0.8, text
    assert len(csv_path.read_text().splitlines()) == 1 + 3, "one CSV row per epoch after the header"
