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


def _csv_rows(path):
    """The rows of a metrics CSV as dicts of floats (``epoch`` an int)."""
    header, *rows = path.read_text().strip().splitlines()
    keys = header.split(",")
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in zip(keys, row.split(","))} for row in rows]


@pytest.mark.parametrize("script", ["torch_digits.py", "keras_digits.py"])
def test_sigusr1_checkpoints_exits_for_requeue_and_resume_continues(script, tmp_path):
    """What slurm/requeue.sbatch relies on: USR1 -> checkpoint -> exit 75 -> --resume, which
    ends where the same training without the interruption ends. Full batches (one step per
    epoch): the examples' shuffling, which restarts with the process, then changes only the
    order of a sum, so the two runs agree to float32 rounding, while a resume that lost the
    model or the optimizer's momentum is off by far more."""
    ckpt, csv, straight_csv = tmp_path / "run.ckpt", tmp_path / "run.csv", tmp_path / "straight.csv"
    common = ["--batch-size", "2048", "--lr", "0.5"]
    env = job_env()
    proc = subprocess.Popen([*mpirun_command(2), sys.executable, str(EXAMPLES / script), *common,
                             "--checkpoint", str(ckpt), "--csv", str(csv), "--epochs", "5000"],
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
    assert 1 <= stopped_at < 5000
    epochs = str(stopped_at + 2)
    resumed = run_job(EXAMPLES / script, np=2, timeout=180,
                      args=[*common, "--checkpoint", str(ckpt), "--csv", str(csv), "--resume", "--epochs", epochs])
    straight = run_job(EXAMPLES / script, np=2, args=[*common, "--csv", str(straight_csv), "--epochs", epochs],
                       timeout=180)
    rows, reference = _csv_rows(csv), _csv_rows(straight_csv)
    assert [r["epoch"] for r in rows] == list(range(1, stopped_at + 3))  # continued, every epoch once
    assert [r["epoch"] for r in reference] == [r["epoch"] for r in rows]
    for row, ref in zip(rows, reference):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4), (row, ref, stopped_at)
        assert abs(row["accuracy"] - ref["accuracy"]) <= 1.5 / 359, (row, ref, stopped_at)  # one test digit
    assert abs(final_accuracy(resumed) - final_accuracy(straight)) <= 1.5 / 359
    # the two epochs after the stop moved the loss by far more than the tolerance above
    assert reference[-1]["loss"] < 0.99 * reference[stopped_at - 1]["loss"], reference[stopped_at - 1:]
