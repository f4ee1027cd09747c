"""Run a Python script as a real MPI job from a test, with a hard timeout.

Every distributed test goes through :func:`run_job`: it owns the launcher flags (running
as root, oversubscribing 2 cores with 4 ranks, one thread per rank) so no test repeats them,
and it kills the whole process group when the timeout passes, so a hang fails the test
instead of stalling the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

#: Default hard limit for one MPI job, in seconds.
DEFAULT_TIMEOUT = 180

#: Environment every job gets: quiet TensorFlow, one compute thread per rank (2 cores,
#: up to 4 ranks), and permission to run as root inside containers.
JOB_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",  # Open MPI 4
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",  # Open MPI 5 (PRRTE)
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(REPO),
}


@dataclass
class JobResult:
    """What a finished (or killed) job left: exit code, output, and whether it timed out."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def results(self, tag: str = "RESULT") -> list[dict]:
        """The JSON objects the script printed on lines starting with ``tag``."""
        out = []
        for line in self.stdout.splitlines():
            if line.startswith(tag + " "):
                out.append(json.loads(line[len(tag) + 1:]))
        return out

    def check(self) -> JobResult:
        """Raise with the whole output unless the job exited 0 in time."""
        if self.timed_out or self.returncode != 0:
            raise AssertionError(
                f"job {'timed out' if self.timed_out else f'exited {self.returncode}'} "
                f"after {self.seconds:.1f}s: {' '.join(self.command)}\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
            )
        return self


def mpirun_command(np: int) -> list[str]:
    """The mpirun prefix for ``np`` local ranks (no binding: ranks share 2 cores)."""
    return [shutil.which("mpirun") or "mpirun", "-np", str(np), "--bind-to", "none"]


def run_command(
    command: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> JobResult:
    """Run ``command`` with :func:`job_env`; see :func:`run_in_env`."""
    return run_in_env(command, job_env(env), timeout=timeout, cwd=cwd)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with :data:`JOB_ENV`, this venv first on ``PATH``, and
    ``extra``: what every job a test starts runs with (also jobs started in the background)."""
    env = dict(os.environ)
    env.update(JOB_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if extra:
        env.update(extra)
    return env


def run_in_env(
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float,
    cwd: str | os.PathLike | None = None,
) -> JobResult:
    """Run ``command`` with exactly ``env`` in its own process group; kill the group on timeout.

    Always an explicit environment: after MPI was initialised in this process (unit tests run
    a world of one here), Open MPI has setenv()'d OMPI_*/PMIX_* variables that ``os.environ``
    does not show but an inherited environment would carry into ``mpirun``, which then fails.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env),
        cwd=str(cwd or REPO),
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return JobResult(list(command), proc.returncode, stdout, stderr, timed_out, time.monotonic() - started)


def run_job(
    script: str | os.PathLike,
    np: int = 2,
    args: Sequence[str] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    launcher: Sequence[str] | None = None,
) -> JobResult:
    """Run ``python script args...`` on ``np`` ranks under mpirun (or ``launcher``).

    ``script`` is a path, or a bare name looked up in ``tests/scripts/``.
    """
    path = Path(script)
    if not path.is_absolute() and not path.exists():
        path = SCRIPTS / path
    prefix = list(launcher) if launcher is not None else mpirun_command(np)
    return run_command([*prefix, sys.executable, str(path), *args], timeout=timeout, env=env)


class Checks(dict):
    """A finished job's RESULT lines by their ``check`` field. A missing one fails the test that
    asks for it, with the job's output; the job's own exit is for a test of its own
    (``checks.job.check()``), so one broken check fails alone."""

    def __init__(self, job):
        super().__init__((r["check"], r) for r in job.results())
        self.job = job

    def __missing__(self, name):
        raise AssertionError(f"no RESULT for {name!r}; the job {'timed out' if self.job.timed_out else 'exited'} "
                             f"{self.job.returncode}:\n{self.job.output[-6000:]}")
