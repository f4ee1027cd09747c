"""The sync examples train to the accuracy the README promises, on 2 real MPI ranks."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mpirun import REPO, job_env, mpirun_command, run_job

EXAMPLES = REPO / "examples"


def final_accuracy(job) -> float:
    job.check()
    found = re.findall(r"final test accuracy: ([0-9.]+)", job.stdout)
    assert len(found) == 1, "only rank 0 prints the result"
    return float(found[0])


@pytest.mark.parametrize(
    "script, args",
    [
        ("torch_digits.py", []),
        ("torch_digits.py", ["--compression", "fp16"]),
        ("keras_digits.py", []),
        ("keras_digits.py", ["--compression", "fp16"]),
    ],
    ids=["torch-sync", "torch-sync-fp16", "keras-sync", "keras-sync-fp16"],
)
def test_sync_example_reaches_95_percent(script, args, tmp_path):
    csv = tmp_path / "run.csv"
    job = run_job(EXAMPLES / script, np=2, args=[*args, "--csv", str(csv)], timeout=240)
    assert final_accuracy(job) >= 0.95
    assert "steps per rank: [" in job.stdout
    rows = csv.read_text().strip().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + 12  # header + one row per epoch, rank 0 only


@pytest.mark.parametrize("script", ["torch_digits.py", "keras_digits.py"])
def test_sigusr1_checkpoints_exits_for_requeue_and_resume_continues(script, tmp_path):
    """What slurm/requeue.sbatch relies on: USR1 -> checkpoint -> exit 75 -> --resume."""
    ckpt, csv = tmp_path / "run.ckpt", tmp_path / "run.csv"
    common = ["--checkpoint", str(ckpt), "--csv", str(csv)]
    env = job_env()
    proc = subprocess.Popen([*mpirun_command(2), sys.executable, str(EXAMPLES / script), *common,
                             "--epochs", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint written"
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards USR1 to every rank
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75
    stopped_at = len(csv.read_text().strip().splitlines()) - 1
    assert 1 <= stopped_at < 500
    job = run_job(EXAMPLES / script, np=2, args=[*common, "--resume", "--epochs", str(stopped_at + 2)], timeout=180)
    assert final_accuracy(job) > 0.5
    epochs = [int(row.split(",")[0]) for row in csv.read_text().strip().splitlines()[1:]]
    assert epochs == list(range(1, stopped_at + 3))  # continued where it stopped, every epoch once
