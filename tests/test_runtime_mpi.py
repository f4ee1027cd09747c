"""hva.init() under each launcher, and failure handling, with real MPI jobs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mpirun import SCRIPTS, job_env, mpirun_command, run_command, run_job


def contexts(job):
    job.check()
    return sorted(job.results(), key=lambda r: r["rank"])


def horovodrun_results(job):
    """RESULT objects from horovodrun's output, whose lines carry a '[rank]<stdout>:' prefix."""
    job.check()
    found = [json.loads(line.split("RESULT ", 1)[1]) for line in job.stdout.splitlines() if "RESULT " in line]
    return sorted(found, key=lambda r: r["rank"])


HOROVODRUN = shutil.which("horovodrun", path=str(SCRIPTS.parents[1] / ".venv" / "bin")) or "horovodrun"


@pytest.mark.parametrize("np_", [2, 4])
def test_init_under_mpirun(np_):
    found = contexts(run_job("report_context.py", np=np_, args=["--horovod"] if np_ == 2 else []))
    assert [c["rank"] for c in found] == list(range(np_))
    for c in found:
        assert c["size"] == np_ and c["launcher"] == "mpirun" and c["mpi_world"]
        assert c["local_size"] == np_ and c["local_rank"] == c["rank"]  # one node
        assert c["thread_level"] == "MPI_THREAD_MULTIPLE"
        assert c["is_root"] == (c["rank"] == 0)
        if np_ == 2:  # Horovod (both bindings) and MPI agree on who is who
            assert c["hvd_torch"] == [c["rank"], np_, c["local_rank"]]
            assert c["hvd_tensorflow"] == [c["rank"], np_, c["local_rank"]]


def test_plain_python_is_a_world_of_one():
    job = run_command([sys.executable, str(SCRIPTS / "report_context.py"), "--horovod"], timeout=120)
    (c,) = contexts(job)
    assert (c["rank"], c["size"], c["local_rank"], c["launcher"]) == (0, 1, 0, "python")
    assert c["hvd_torch"] == [0, 1, 0]


def test_init_under_horovodrun_mpi():
    job = run_command([HOROVODRUN, "-np", "2", "--mpi", sys.executable, str(SCRIPTS / "report_context.py"),
                       "--horovod"], timeout=120)
    found = horovodrun_results(job)
    assert [(c["rank"], c["size"], c["launcher"], c["mpi_world"]) for c in found] == [
        (0, 2, "horovodrun", True), (1, 2, "horovodrun", True)]
    assert all(c["hvd_torch"][:2] == [c["rank"], 2] for c in found)


def _seconds_from_crash_to_end(job) -> float:
    """From rank 1's own timestamp just before it raises to the end of the job (start-up,
    which depends on the machine, is not counted); ``job`` must have just returned."""
    (crashed_at,) = re.findall(r"CRASHING_AT ([0-9.]+)", job.stdout)
    return time.time() - float(crashed_at)


def test_a_crashing_rank_ends_the_job_fast_with_its_message():
    job = run_job("crash_rank1.py", np=2, timeout=90)
    assert not job.timed_out and job.returncode != 0
    assert _seconds_from_crash_to_end(job) < 15  # measured here: about 1 s
    assert "[rank 1]" in job.stderr and "rank one failed on purpose" in job.stderr


def test_a_crashing_rank_ends_a_job_waiting_in_horovod():
    job = run_job("crash_rank1.py", np=2, args=["horovod"], timeout=90)
    assert not job.timed_out and job.returncode != 0
    assert _seconds_from_crash_to_end(job) < 15
    assert "rank one failed on purpose" in job.stderr


def test_sigterm_to_mpirun_ends_the_job_quickly(tmp_path):
    env = job_env()
    cmd = [*mpirun_command(2), sys.executable, "-c",
           "import hvdagents as h, os, time; c = h.init(); os.write(1, f'up {c.rank}\\n'.encode()); "
           "c.comm.barrier(); time.sleep(120)"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while sum(line.startswith("up") for line in lines) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        assert sum(line.startswith("up") for line in lines) == 2, "".join(lines)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - started < 15
        assert proc.returncode != 0, "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_models_that_differ_between_ranks_are_refused(framework):
    job = run_job("model_mismatch.py", np=2, args=[framework], timeout=90)
    assert not job.timed_out and job.returncode != 0  # refused on every rank: no hang
    out = job.output
    for rank in (0, 1):
        assert f"rank {rank} refused" in out
    assert "differs between ranks" in out and "rank(s) 1" in out
    assert "hidden" in out or "0.weight" in out
    assert "was not refused" not in out


def test_horovodrun_gloo_runs_sync_and_refuses_async():
    job = run_command([HOROVODRUN, "-np", "2", "--gloo", sys.executable, str(SCRIPTS / "gloo_agents.py")],
                      timeout=120)
    found = horovodrun_results(job)
    assert [(c["rank"], c["size"], c["launcher"], c["mpi_world"], c["hvd"]) for c in found] == [
        (0, 2, "horovodrun-gloo", False, [0, 2]), (1, 2, "horovodrun-gloo", False, [1, 2])]
    assert all(c["identical"] for c in found)
    for c in found:
        assert "horovodrun --gloo" in c["refused"] and "mpirun" in c["refused"], c["refused"]
