"""Simulated hosts for the tests: :class:`hvdagents.testing.SimulatedHosts` plus running a
job across them with the tests' job environment and hard timeout (``tests/mpirun.py``)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

from hvdagents.testing import SimulatedHosts as _Hosts
from hvdagents.testing import unavailable_reason
from mpirun import JobResult, job_env, run_in_env

__all__ = ["SimulatedHosts", "unavailable_reason"]


class SimulatedHosts(_Hosts):
    """Simulated hosts that run test jobs (see :mod:`hvdagents.testing.simulated_hosts`)."""

    def mpirun(self, script: str | os.PathLike, slots: int, args: Sequence[str] = ()) -> list[str]:
        """``mpirun`` over every host, ``slots`` ranks each, running ``python script args``."""
        return [shutil.which("mpirun") or "mpirun", "-np", str(slots * self.count), "-H", self.hosts_arg(slots),
                "--bind-to", "none", sys.executable, str(script), *args]

    def run(self, command: Sequence[str], *, timeout: float,
            env: Optional[Mapping[str, str]] = None) -> JobResult:
        """Run ``command`` on host 1 with the job environment and :attr:`env`; on a timeout
        every process in the hosts is killed too."""
        result = run_in_env([*self.enter(0), *command], job_env({**self.env, **(env or {})}), timeout=timeout)
        if result.timed_out:
            self.kill_all()
        return result
