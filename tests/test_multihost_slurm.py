"""SLURM across two simulated hosts: one slurmd per host (network namespaces, TCP only), the
controller on node1, jobs submitted with the project's templates as a user would.

Skipped, with the reason, where hosts cannot be simulated or SLURM cannot be installed."""

from __future__ import annotations

import json
import re
import sys

from hvdagents.testing.simulated_hosts import SUBNET
from mpirun import REPO, SCRIPTS

TEMPLATES = REPO / "slurm"
#: sbatch options: one task per node on both nodes, one stand-in GPU each.
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10"]
JOB_TIMEOUT = 240


def _run(slurm, template: str, name: str, env: dict[str, str]) -> str:
    out = slurm.root / "jobs" / f"{name}.out"
    out.parent.mkdir(exist_ok=True)
    job = slurm.sbatch(TEMPLATES / template, *TWO_NODES, f"--job-name={name}", f"--output={out}",
                       env={"PYTHON": sys.executable, "NET_IF": SUBNET, "OMPI_MCA_btl_tcp_if_include": SUBNET,
                            **env})
    state = slurm.wait_done(job, JOB_TIMEOUT)
    text = out.read_text() if out.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}\n{slurm.job(job)}\n{slurm.diagnostics()}"
    return text


def test_the_multi_node_template_makes_one_world_across_two_nodes(two_node_slurm):
    text = _run(two_node_slurm, "multi_node.sbatch", "two-nodes", {"SCRIPT": str(SCRIPTS / "slurm_hello.py")})
    assert "MPI sees all 2 ranks on node[1-2]" in text, text
    found = sorted((json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")),
                   key=lambda r: r["rank"])
    assert [(r["rank"], r["size"], r["launcher"], r["rank_sum"]) for r in found] == [(0, 2, "srun", 1),
                                                                                      (1, 2, "srun", 1)], text
    assert {r["host"] for r in found} == {"node1", "node2"}
    assert all(r["local_rank"] == 0 and r["local_size"] == 1 for r in found), found


def test_the_async_template_trains_across_two_nodes_through_the_relay(two_node_slurm):
    text = _run(two_node_slurm, "async_easgd.sbatch", "two-nodes-easgd",
                {"SCRIPT": str(REPO / "examples" / "async_digits.py"), "ARGS": "--epochs 10"})
    (accuracy,) = re.findall(r"final test accuracy: ([0-9.]+)", text)
    assert float(accuracy) >= 0.9, text[-2000:]
    assert "strategy: easgd, ranks: 2" in text, text[-2000:]
