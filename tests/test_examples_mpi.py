"""The sync examples train to the accuracy the README promises, on 2 real MPI ranks."""

import re

import pytest

from mpirun import REPO, run_job

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
    ],
    ids=["torch-sync", "torch-sync-fp16", "keras-sync"],
)
def test_sync_example_reaches_95_percent(script, args, tmp_path):
    csv = tmp_path / "run.csv"
    job = run_job(EXAMPLES / script, np=2, args=[*args, "--csv", str(csv)], timeout=240)
    assert final_accuracy(job) >= 0.95
    assert "steps per rank: [" in job.stdout
    rows = csv.read_text().strip().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + 12  # header + one row per epoch, rank 0 only
