"""``python -m hvdagents doctor`` on this machine: alone, under mpirun, and its verdict logic."""

import sys

from hvdagents import doctor
from mpirun import mpirun_command, run_command


def test_doctor_passes_on_a_good_setup():
    job = run_command([sys.executable, "-m", "hvdagents", "doctor"], timeout=120).check()
    out = job.stdout
    assert "verdict: ready" in out
    for needed in ("MPI_THREAD_MULTIPLE", "Horovod PyTorch", "Horovod TensorFlow", "controllers: MPI", "rdma"):
        assert needed in out
    assert "\x00" not in out


def test_doctor_under_mpirun_reports_ranks_once():
    job = run_command([*mpirun_command(2), sys.executable, "-m", "hvdagents", "doctor"], timeout=120).check()
    assert job.stdout.count("verdict: ready") == 1  # rank 0 prints
    assert "mpirun; rank 0 of 2" in job.stdout and "2 ranks on 1 node(s)" in job.stdout


def test_doctor_fails_when_a_required_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_checks", lambda: [doctor.Check("Horovod", doctor.FAIL, "not importable")])
    assert doctor.main([]) == 1
    assert "NOT ready (1 failed check(s))" in capsys.readouterr().out
