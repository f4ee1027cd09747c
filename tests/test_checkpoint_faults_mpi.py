"""A checkpoint that does not fit is refused on every rank before any rank changes its model
(tests/scripts/checkpoint_faults.py ``refuse``, 2 ranks; the checkpoints of another model,
strategy and framework are made first by plain processes, ``make``).

Every case: each rank raises (``CheckpointError``, or ``FileNotFoundError`` for a missing
file) with the same message naming the file and what differs, each rank's weights and
optimizer state hash as before, nothing in a crafted file runs, and the job goes on: the
good checkpoint then loads on every rank and the job exits 0 within its timeout.
"""

from __future__ import annotations

import sys

import pytest

from mpirun import SCRIPTS, run_command, run_job

EXPECTED = {
    "truncated": "is truncated or corrupted: a zip archive without its central directory",
    "corrupted": "is truncated or corrupted: Bad CRC-32 for file",
    "other model": "is for another model: parameter",
    "other strategy": "holds the state of another strategy: Downpour in the checkpoint, Sync in this agent",
    "other framework": "is for another framework: the file is {other}, this agent is {mine}",
    "runs code": "is not a safe checkpoint: it is a bare pickle",
    "missing": "cannot read checkpoint",
}
NAMES = {"torch": "PyTorch (TorchAgent)", "keras": "Keras (KerasAgent)"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    for framework in ("torch", "keras"):
        run_command([sys.executable, str(SCRIPTS / "checkpoint_faults.py"), "make", framework, str(directory)],
                    timeout=180).check()
    return directory


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_checkpoint_that_does_not_fit_is_refused_on_every_rank_before_anything_changes(framework, made):
    job = run_job("checkpoint_faults.py", np=2, args=["refuse", framework, str(made)], timeout=240).check()
    results = job.results()
    other = "keras" if framework == "torch" else "torch"
    for case, expected in EXPECTED.items():
        expected = expected.format(other=NAMES[other], mine=NAMES[framework])
        rows = sorted((r for r in results if r["case"] == case), key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == [0, 1], (case, rows)
        assert rows[0]["error"] == rows[1]["error"], f"{case}: the ranks' messages differ: {rows}"
        error = rows[0]["error"]
        assert error and expected in error and "checkpoint" in error, (case, error)
        assert rows[0]["kind"] == ("FileNotFoundError" if case == "missing" else "CheckpointError"), rows
        assert all(r["unchanged"] for r in rows), f"{case}: a rank's model or optimizer changed: {rows}"
        assert not any(r["ran"] for r in rows), f"{case}: the crafted file ran code"
    other_model = next(r["error"] for r in results if r["case"] == "other model")
    assert "shape (48, 64)" in other_model or "shape (64, 48)" in other_model, other_model  # names the shapes
    good = sorted((r for r in results if r["case"] == "good"), key=lambda r: r["rank"])
    assert [r["extra"] for r in good] == [{"epoch": 2}] * 2
    assert all(r["restored"] for r in good), good  # every rank holds rank 0's saved state again
