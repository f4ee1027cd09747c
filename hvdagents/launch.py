"""``python -m hvdagents launch``: start a training script on N ranks with the right launcher.

::

    python -m hvdagents launch -np 4 train.py --epochs 3             # mpirun here, srun in SLURM
    python -m hvdagents launch -np 8 --hosts n1:4,n2:4 train.py       # mpirun over two hosts
    python -m hvdagents launch -np 2 --launcher horovodrun train.py
    python -m hvdagents launch -np 4 --dry-run train.py               # print the command only

``--launcher auto`` (the default) picks ``srun --mpi=pmix`` inside a SLURM allocation
(``SLURM_JOB_ID`` set, no ``--hosts``) and ``mpirun`` everywhere else. The command is built by
:func:`build_command`, a pure function of the settings and an environment; the launcher then
replaces this process (``exec``), so signals such as SLURM's go straight to it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = [
    "LAUNCHERS",
    "LaunchSpec",
    "parse_hosts",
    "choose_launcher",
    "forwarded_variables",
    "build_command",
    "main",
]

#: Values of ``--launcher``.
LAUNCHERS = ("auto", "srun", "mpirun", "horovodrun")

#: Variables ``mpirun -x`` forwards to every rank when they are set here. Open MPI passes its
#: own ``OMPI_MCA_*`` settings by itself; other ``OMPI_*`` variables describe *this* process's
#: job (when nested) and must not leak into the ranks, so no ``OMPI_`` prefix here.
FORWARD_NAMES = frozenset({
    "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KERAS_BACKEND", "CUDA_HOME",
})
#: Prefixes of variables forwarded the same way (NCCL and UCX tuning, Horovod and hvdagents
#: settings, TensorFlow's logging and threading knobs).
FORWARD_PREFIXES = ("NCCL_", "HOROVOD_", "HVDAGENTS_", "TF_", "UCX_")


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch: ``python script args...`` on ``np`` ranks.

    ``hosts``: ``(hostname, slots)`` pairs, or empty for the local machine (or, under srun,
    the allocation). ``python``: the interpreter every rank runs; it must exist at the same
    path on every host (a shared file system or an identical environment).
    """

    np: int
    script: str
    args: tuple[str, ...] = ()
    hosts: tuple[tuple[str, int], ...] = ()
    launcher: str = "auto"
    oversubscribe: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        if isinstance(self.np, bool) or not isinstance(self.np, int) or self.np < 1:
            raise ValueError(f"LaunchSpec.np must be an integer >= 1; got {self.np!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"LaunchSpec.launcher must be one of {LAUNCHERS}; got {self.launcher!r}")
        for name in ("script", "python"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"LaunchSpec.{name} must name a file; got {getattr(self, name)!r}")
        if not isinstance(self.args, tuple) or not all(isinstance(a, str) for a in self.args):
            raise ValueError(f"LaunchSpec.args must be a tuple of strings; got {self.args!r}")
        if not isinstance(self.hosts, tuple) or not all(
                isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and h[0]
                and isinstance(h[1], int) and not isinstance(h[1], bool) and h[1] >= 1 for h in self.hosts):
            raise ValueError(f"LaunchSpec.hosts must be a tuple of (host, slots >= 1) pairs; got {self.hosts!r}")
        if not isinstance(self.oversubscribe, bool):
            raise ValueError(f"LaunchSpec.oversubscribe must be True or False; got {self.oversubscribe!r}")


def parse_hosts(text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``"h1:4,h2:4"`` (slots default to 1: ``"h1,h2"``) into ``(host, slots)`` pairs."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, slots_text = item.partition(":")
        try:
            slots = int(slots_text) if sep else 1
        except ValueError:
            slots = 0
        if not name or slots < 1:
            raise ValueError(f"--hosts entries must look like host:slots with slots >= 1; got {item!r}")
        hosts.append((name, slots))
    if not hosts:
        raise ValueError(f"--hosts must name at least one host; got {text!r}")
    return tuple(hosts)


def choose_launcher(spec: LaunchSpec, env: Mapping[str, str]) -> str:
    """The launcher ``auto`` stands for: srun inside a SLURM allocation unless hosts were
    given (a host list is mpirun's way of placing ranks), mpirun otherwise."""
    if spec.launcher != "auto":
        return spec.launcher
    if env.get("SLURM_JOB_ID") and not spec.hosts:
        return "srun"
    return "mpirun"


def forwarded_variables(env: Mapping[str, str]) -> list[str]:
    """Names of the set variables ``mpirun -x`` should forward (sorted)."""
    return sorted(
        name for name in env
        if name in FORWARD_NAMES or name.startswith(FORWARD_PREFIXES)
    )


def build_command(spec: LaunchSpec, env: Mapping[str, str]) -> list[str]:
    """The full launcher command line for ``spec`` in environment ``env``. Pure.

    - srun: ``srun --mpi=pmix -n N`` (PMIx, so MPI sees all N ranks); passes the allocation's
      ``--cpus-per-task`` (srun 22.05 stopped inheriting it); ``--overcommit`` if asked.
    - mpirun: ``mpirun -np N -bind-to none -map-by slot [-H h:s,...] [--oversubscribe]``
      with ``-x NAME`` for each variable of :func:`forwarded_variables`.
    - horovodrun: ``horovodrun -np N [-H h:s,...] --mpi`` (MPI, not Gloo: asynchronous
      strategies need an MPI world); oversubscription goes through ``--mpi-args``.

    Raises ``ValueError`` for settings that cannot work (srun with ``--hosts``, fewer host
    slots than ranks without ``--oversubscribe``).
    """
    launcher = choose_launcher(spec, env)
    program = [spec.python, spec.script, *spec.args]
    host_arg = ",".join(f"{name}:{slots}" for name, slots in spec.hosts)
    slots = sum(n for _, n in spec.hosts)
    if spec.hosts and slots < spec.np and not spec.oversubscribe:
        raise ValueError(
            f"--hosts {host_arg} gives {slots} slots for {spec.np} ranks: add slots, "
            "or pass --oversubscribe to run more ranks than slots"
        )
    if launcher == "srun":
        if spec.hosts:
            raise ValueError(
                "srun places ranks over its allocation itself and takes no --hosts: "
                "drop --hosts, or use --launcher mpirun to place ranks by host"
            )
        command = ["srun", "--mpi=pmix", "-n", str(spec.np)]
        cpus = env.get("SLURM_CPUS_PER_TASK")
        if cpus:
            command.append(f"--cpus-per-task={cpus}")
        if spec.oversubscribe:
            command.append("--overcommit")
        return command + program
    if launcher == "mpirun":
        command = ["mpirun", "-np", str(spec.np), "-bind-to", "none", "-map-by", "slot"]
        if spec.hosts:
            command += ["-H", host_arg]
        if spec.oversubscribe:
            command.append("--oversubscribe")
        for name in forwarded_variables(env):
            command += ["-x", name]
        return command + program
    command = ["horovodrun", "-np", str(spec.np)]
    if spec.hosts:
        command += ["-H", host_arg]
    command.append("--mpi")
    if spec.oversubscribe:
        command.append("--mpi-args=--oversubscribe")
    return command + program


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hvdagents launch",
        description="Start a Python script on N ranks with srun (inside SLURM), mpirun or horovodrun.",
    )
    parser.add_argument("-np", "--np", dest="np", type=_positive_int, required=True,
                        help="number of ranks (processes)")
    parser.add_argument("--hosts", default=None,
                        help="comma-separated host:slots list, e.g. n1:4,n2:4 (mpirun, horovodrun)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                        help="auto: srun inside a SLURM allocation, otherwise mpirun (default)")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="allow more ranks than slots/cores (testing on a small machine)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command (shell-quoted) instead of running it")
    parser.add_argument("script", help="the Python script every rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hvdagents launch``; returns an exit status.

    Without ``--dry-run`` the launcher replaces this process and this does not return.
    """
    parser = _parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = LaunchSpec(
            np=ns.np,
            script=ns.script,
            args=tuple(ns.args),
            hosts=parse_hosts(ns.hosts) if ns.hosts else (),
            launcher=ns.launcher,
            oversubscribe=ns.oversubscribe,
        )
        command = build_command(spec, os.environ)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which(command[0]) is None:
        print(f"hvdagents launch: {command[0]!r} is not on PATH "
              "(load your MPI/SLURM module, or choose another --launcher)", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)
    return 0  # not reached
