"""``hvdagents launch``: the command built for each launcher (pure), the CLI, and one real
mpirun launch through ``python -m hvdagents launch``."""

import shlex
import sys

import pytest

from hvdagents import launch
from hvdagents.launch import LaunchSpec, build_command, choose_launcher, forwarded_variables, parse_hosts
from mpirun import SCRIPTS, run_command

PY = "/venv/bin/python"
ENV = {
    "PATH": "/venv/bin:/usr/bin",
    "LD_LIBRARY_PATH": "/opt/cuda/lib64",
    "PYTHONPATH": "/src",
    "NCCL_DEBUG": "INFO",
    "NCCL_SOCKET_IFNAME": "ib0",
    "HOROVOD_FUSION_THRESHOLD": "0",
    "OMPI_MCA_btl_tcp_if_include": "ib0",
    "OMPI_COMM_WORLD_SIZE": "8",
    "HOME": "/root",
    "SECRET_TOKEN": "x",
}
IN_SLURM = {**ENV, "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8"}


def spec(**kw):
    base = {"np": 4, "script": "train.py", "args": ("--epochs", "3"), "python": PY}
    return LaunchSpec(**{**base, **kw})


def test_auto_picks_srun_inside_an_allocation_and_mpirun_outside():
    assert choose_launcher(spec(), IN_SLURM) == "srun"
    assert choose_launcher(spec(), ENV) == "mpirun"
    assert choose_launcher(spec(hosts=(("n1", 4),)), IN_SLURM) == "mpirun"
    assert choose_launcher(spec(launcher="horovodrun"), IN_SLURM) == "horovodrun"


def test_srun_command_uses_pmix_and_passes_cpus_per_task():
    assert build_command(spec(), IN_SLURM) == [
        "srun", "--mpi=pmix", "-n", "4", "--cpus-per-task=8", PY, "train.py", "--epochs", "3",
    ]
    assert build_command(spec(launcher="srun", oversubscribe=True), ENV) == [
        "srun", "--mpi=pmix", "-n", "4", "--overcommit", PY, "train.py", "--epochs", "3",
    ]


def test_srun_with_hosts_is_refused():
    with pytest.raises(ValueError, match="--launcher mpirun"):
        build_command(spec(launcher="srun", hosts=(("n1", 4),)), IN_SLURM)


def test_mpirun_command_forwards_the_variables_that_matter():
    assert build_command(spec(), ENV) == [
        "mpirun", "-np", "4", "-bind-to", "none", "-map-by", "slot",
        "-x", "HOROVOD_FUSION_THRESHOLD", "-x", "LD_LIBRARY_PATH", "-x", "NCCL_DEBUG",
        "-x", "NCCL_SOCKET_IFNAME", "-x", "PATH", "-x", "PYTHONPATH",
        PY, "train.py", "--epochs", "3",
    ]


def test_forwarded_variables_leave_out_open_mpi_internals_and_the_rest():
    names = forwarded_variables({**ENV, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"})
    assert "OMPI_COMM_WORLD_SIZE" not in names and "OMPI_MCA_btl_tcp_if_include" not in names
    assert "HOME" not in names and "SECRET_TOKEN" not in names
    assert {"TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND", "PATH"} <= set(names)
    assert names == sorted(names)


def test_mpirun_with_hosts_and_oversubscribe():
    command = build_command(spec(np=6, hosts=(("n1", 2), ("n2", 2)), oversubscribe=True), {})
    assert command == [
        "mpirun", "-np", "6", "-bind-to", "none", "-map-by", "slot", "-H", "n1:2,n2:2", "--oversubscribe",
        PY, "train.py", "--epochs", "3",
    ]


def test_too_few_host_slots_are_refused_unless_oversubscribing():
    with pytest.raises(ValueError, match="gives 4 slots for 6 ranks"):
        build_command(spec(np=6, hosts=(("n1", 2), ("n2", 2))), {})


def test_horovodrun_command_asks_for_mpi():
    assert build_command(spec(launcher="horovodrun", hosts=(("n1", 2), ("n2", 2))), IN_SLURM) == [
        "horovodrun", "-np", "4", "-H", "n1:2,n2:2", "--mpi", PY, "train.py", "--epochs", "3",
    ]
    assert build_command(spec(launcher="horovodrun", np=2, args=(), oversubscribe=True), {}) == [
        "horovodrun", "-np", "2", "--mpi", "--mpi-args=--oversubscribe", PY, "train.py",
    ]


def test_parse_hosts():
    assert parse_hosts("n1:4, n2:2,n3") == (("n1", 4), ("n2", 2), ("n3", 1))
    for bad in ("n1:0", "n1:x", ":3", ","):
        with pytest.raises(ValueError):
            parse_hosts(bad)


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match="np must be an integer >= 1; got 0"):
        spec(np=0)
    with pytest.raises(ValueError, match="launcher must be one of"):
        spec(launcher="ssh")


def test_dry_run_prints_the_shell_quoted_command(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    argv = ["-np", "2", "--dry-run", "--oversubscribe", "my script.py", "--name", "a b", "-np", "9"]
    code = launch.main(argv)
    assert code == 0
    printed = capsys.readouterr().out.strip()
    words = shlex.split(printed)
    assert words[:8] == ["mpirun", "-np", "2", "-bind-to", "none", "-map-by", "slot", "--oversubscribe"]
    assert words[-6:] == [sys.executable, "my script.py", "--name", "a b", "-np", "9"]


def test_cli_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        launch.main(["-np", "0", "x.py"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        launch.main(["-np", "2", "--launcher", "srun", "--hosts", "n1:2", "--dry-run", "x.py"])
    assert "--launcher mpirun" in capsys.readouterr().err


def test_missing_launcher_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch.main(["-np", "2", "x.py"]) == 127
    assert "'mpirun' is not on PATH" in capsys.readouterr().err


# ---- a real launch ------------------------------------------------------------------------------
def test_launch_runs_a_script_on_two_ranks_with_mpirun():
    command = [sys.executable, "-m", "hvdagents", "launch", "-np", "2", "--oversubscribe",
               "slurm_hello.py", "--x", "1"]
    # SLURM_JOB_ID emptied: 'auto' must pick mpirun even when pytest runs inside an allocation.
    result = run_command(command, cwd=SCRIPTS, env={"SLURM_JOB_ID": ""}, timeout=120).check()
    results = result.results()
    assert sorted(r["rank"] for r in results) == [0, 1], result.output
    assert all(r["size"] == 2 and r["launcher"] == "mpirun" and r["rank_sum"] == 1 for r in results)
    assert all(r["argv"] == ["--x", "1"] for r in results)
