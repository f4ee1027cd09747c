"""The SLURM templates' variables (``SCRIPT``, ``PYTHON``, ``FRAMEWORK``) checked before anything
starts: a bad one stops the batch script with exit 2 and a line naming the variable and its
value, before any ``srun``/``mpirun`` (which would start every task only for each to fail
alike). Run with bash alone, as the batch shell runs them; no SLURM needed: a template that
got past its checks would call ``srun``/``scontrol``, which a stub on PATH records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
SLURM_ENV = {"SLURM_JOB_NAME": "t", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1"}


def _run(template: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol", "mpirun", "horovodrun"):  # record a launch, then fail it
        (stubs / tool).write_text(f"#!/bin/sh\necho LAUNCHED {tool} >&2\nexit 9\n")
        (stubs / tool).chmod(0o755)
    full = {"PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable, **SLURM_ENV, **env}
    return subprocess.run(["bash", str(template)], cwd=REPO, env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
@pytest.mark.parametrize("variable, value, words", [
    ("SCRIPT", "examples/no_such_script.py", "SCRIPT='examples/no_such_script.py' is not a file"),
    ("PYTHON", "python-that-is-not-here", "PYTHON='python-that-is-not-here' is not a command"),
])
def test_a_bad_variable_stops_the_template_before_any_launch(template, variable, value, words, tmp_path):
    proc = _run(template, tmp_path, **{variable: value})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert words in proc.stderr
    assert "LAUNCHED" not in proc.stderr


def test_a_framework_the_easgd_template_does_not_know_is_refused(tmp_path):
    proc = _run(REPO / "slurm" / "async_easgd.sbatch", tmp_path, FRAMEWORK="jax")
    assert proc.returncode == 2 and "FRAMEWORK must be torch or keras; got 'jax'" in proc.stderr
    assert "LAUNCHED" not in proc.stderr


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_good_variables_pass_the_checks_and_reach_the_launch(template, tmp_path):
    proc = _run(template, tmp_path)  # the defaults: the template's own script, this Python
    assert "ERROR: SCRIPT" not in proc.stderr and "ERROR: PYTHON" not in proc.stderr, proc.stderr
    assert "LAUNCHED" in proc.stderr, proc.stderr  # it went on to srun/scontrol/mpirun (stubbed)
