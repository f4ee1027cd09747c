"""A real SLURM (munged + slurmctld + slurmd) under a temporary directory, for tests: one node
on this machine, or one node per simulated host (``hosts=``, :mod:`hvdagents.testing`).

Everything lives under one directory: the munge key and socket, ``slurm.conf`` (with two
GPUs declared as plain counted resources, so GPU templates can be submitted on a CPU box),
state, spool and logs. Daemons run in the foreground as children of the test process, on free
ports, so several clusters (or a system SLURM) never clash, and :meth:`SlurmCluster.stop`
ends exactly the processes it started. Every client command has a hard timeout; bring-up that
does not finish in time raises :class:`SlurmUnavailable` with the daemons' log tails.

Use as a context manager, or from a shell for poking around::

    python tests/slurm_cluster.py      # starts a cluster, prints `export SLURM_CONF=...`, Ctrl-C stops
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpirun import JOB_ENV, REPO, JobResult, run_in_env  # noqa: E402

__all__ = ["SlurmCluster", "SlurmUnavailable", "install_slurm", "DAEMONS"]

#: Programs a cluster needs on PATH.
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")

#: Seconds allowed for tools/setup_slurm.sh (an apt install on a fresh machine).
INSTALL_TIMEOUT = 600
#: Seconds allowed for the daemons to come up and the node to turn idle.
STARTUP_TIMEOUT = 60
#: Seconds allowed for one client command (sbatch, scontrol, squeue, ...).
CLIENT_TIMEOUT = 30
#: CPUs and GPUs the node declares (more than the machine has: config_overrides allows it).
NODE_CPUS = 4
NODE_GPUS = 2

#: Job states after which a job will not run again by itself.
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE",
}


class SlurmUnavailable(RuntimeError):
    """SLURM could not be installed or brought up; the message says why (with log tails)."""


def install_slurm(timeout: float = INSTALL_TIMEOUT) -> tuple[bool, str]:
    """Make sure SLURM and munge are installed (``tools/setup_slurm.sh``).

    Returns ``(True, "")`` when they are, ``(False, reason)`` when they cannot be installed on
    this machine (not root, no apt-get). Raises :class:`SlurmUnavailable` when an install was
    tried and failed.
    """
    if all(shutil.which(name) for name in DAEMONS):
        return True, ""
    script = REPO / "tools" / "setup_slurm.sh"
    try:
        proc = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired as exc:
        raise SlurmUnavailable(f"{script} did not finish in {timeout:.0f}s") from exc
    if proc.returncode == 3:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "cannot install"
    if proc.returncode != 0:
        raise SlurmUnavailable(f"{script} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return True, ""


def _ephemeral_ports() -> range:
    """The ports the kernel hands out for bind(0) and outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _free_port(taken: Sequence[int] = ()) -> int:
    """A port free here and outside the kernel's ephemeral range. A port from bind(0) is
    ephemeral: on a simulated host (its own network namespace) another job's socket could hold
    it by the time slurmd binds it there ("Unable to bind listen port ... Address already in
    use" failed a two-node start once); ports below that range are only ever taken on purpose."""
    ephemeral = _ephemeral_ports()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in ephemeral or port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise SlurmUnavailable("no free port between 20000 and 32000 outside the ephemeral range")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not written)"
    return "\n".join(text[-lines:])


class SlurmCluster:
    """A one-node SLURM cluster rooted at ``root`` (a fresh, empty directory).

    ``env`` is the environment every client command and every job gets: the test process's
    environment without any ``SLURM_*`` variables of an outer allocation, plus the MPI test
    settings of :mod:`mpirun` and ``SLURM_CONF`` pointing at this cluster.
    """

    def __init__(self, root: str | os.PathLike, hosts: Any = None) -> None:
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        # (name, address) per node; the controller and every client command run on the first
        if hosts is None:
            self.nodes = [(self.node, "127.0.0.1")]
            self._enter: Callable[[int], list[str]] = lambda index: []
        else:  # one slurmd per simulated host, inside its network namespace, under its hostname
            self.nodes = list(zip(hosts.names, hosts.addresses))
            self.node = hosts.names[0]
            # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup file
            # systems slurmd needs. Node-local directories are per node by name (%n in the
            # configuration): the two slurmstepds' PMIx directories clashed in one /tmp.
            self._enter = lambda index: [
                "nsenter", f"--net=/run/netns/{hosts.namespaces[index]}", "unshare", "--uts",
                "sh", "-c", 'hostname "$0"; exec "$@"', hosts.names[index]]
        self.conf = self.root / "etc" / "slurm.conf"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(JOB_ENV)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

    # ---- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait for an idle node."""
        missing = [name for name in DAEMONS if not shutil.which(name)]
        if missing:
            raise SlurmUnavailable(f"not on PATH: {', '.join(missing)} (run tools/setup_slurm.sh)")
        try:
            self._write_config()
            self._start_munge()
            self._spawn("slurmctld", [*self._enter(0), "slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
                       timeout, "slurmctld to answer 'scontrol ping'")
            for index, (name, _) in enumerate(self.nodes):
                self._spawn(f"slurmd-{name}", [*self._enter(index), "slurmd", "-D", "-f", str(self.conf), "-N", name])
            self._wait(self._node_idle, timeout, f"node(s) {', '.join(n for n, _ in self.nodes)} to become idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (TERM, then KILL)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--quiet", "--user", str(os.getuid())], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run(
                ["squeue", "-h", "-o", "%i"], check=False
            ).stdout.strip():
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n, _ in self.nodes), "slurmctld", "munged"]:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def diagnostics(self) -> str:
        """The daemons' log tails, for error messages."""
        return "\n".join(
            f"--- {name} ---\n{_tail(self.logs / f'{name}.log')}"
            for name in ("munged", "slurmctld", *(f"slurmd-{n}" for n, _ in self.nodes))
        )

    # ---- client commands ----------------------------------------------------------------
    def run(
        self,
        command: Sequence[str],
        *,
        timeout: float = CLIENT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        check: bool = True,
    ) -> JobResult:
        """Run a command against this cluster, killed (process group) after ``timeout`` seconds."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        result = run_in_env([*self._enter(0), *command], full_env, timeout=timeout, cwd=cwd)
        return result.check() if check else result

    def sbatch(self, script: str | os.PathLike, *options: str, env: Mapping[str, str] | None = None) -> int:
        """Submit a batch script (``options`` go before it, overriding its ``#SBATCH`` lines)."""
        out = self.run(["sbatch", "--parsable", *options, str(script)], env=env).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``BatchHost``, ...)."""
        text = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", text))

    def state(self, job_id: int) -> str:
        """The job's state, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``."""
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: int, states: set[str] | frozenset[str], timeout: float) -> str:
        """Wait (at most ``timeout`` s) until the job is in one of ``states``; return it.

        Raises ``AssertionError`` with the job record on timeout, and when the job reaches a
        final state that was not asked for.
        """
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            if state in FINAL_STATES:
                break
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} is {state}, waited for {sorted(states)} ({timeout:.0f}s at most):\n"
            f"{self.job(job_id)}\n{self.diagnostics()}"
        )

    def wait_done(self, job_id: int, timeout: float) -> str:
        """Wait (bounded) until the job has ended; cancel it and fail if it runs too long."""
        try:
            return self.wait_state(job_id, FINAL_STATES, timeout)
        except AssertionError:
            self.run(["scancel", "--full", str(job_id)], check=False)
            raise

    # ---- internals ------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("etc", "log", "state", "munge", *(f"{kind}/{name}" for name, _ in self.nodes
                                                      for kind in ("spool", "tmp"))):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (control, control_address) = self.nodes[0]
        self.conf.write_text(
            "\n".join([
                "ClusterName=hvatest",
                f"SlurmctldHost={control}({control_address})",
                f"SlurmctldPort={(controller_port := _free_port())}",
                f"SlurmdPort={_free_port(taken=[controller_port])}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.root / 'munge' / 'munge.socket'}",
                f"StateSaveLocation={self.root / 'state'}",
                f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
                f"TmpFS={self.root / 'tmp' / '%n'}",  # PMIx's client directories, per node
                f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
                f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SlurmdParameters=config_overrides",
                "SchedulerType=sched/builtin",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobRequeue=1",
                "KillWait=5",
                "MinJobAge=600",
                "InactiveLimit=0",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "JobAcctGatherType=jobacct_gather/none",
                "GresTypes=gpu",
                *(f"NodeName={name} NodeAddr={address} CPUs={NODE_CPUS} Gres=gpu:{NODE_GPUS} State=UNKNOWN"
                  for name, address in self.nodes),
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )
        # Stand-in GPUs: SLURM wants a character device per GPU, so each is a copy of
        # /dev/null (made with mknod, as root). SLURM allocates them and sets
        # CUDA_VISIBLE_DEVICES; nothing reads or writes them.
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        null = os.stat("/dev/null").st_rdev
        for index in range(NODE_GPUS):
            path = devices / f"gpu{index}"
            try:
                os.mknod(path, stat.S_IFCHR | 0o666, null)
            except OSError as exc:
                raise SlurmUnavailable(f"cannot make the stand-in GPU device {path}: {exc}") from exc
        (self.conf.parent / "gres.conf").write_text("AutoDetect=off\n" + "".join(
            f"NodeName={name} Name=gpu File={devices}/gpu[0-{NODE_GPUS - 1}] Flags=nvidia_gpu_env\n"
            for name, _ in self.nodes))

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.root / "munge"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}", f"--log-file={self.logs / 'munged.log'}",
        ])
        self._wait(lambda: (munge / "munge.socket").exists(), STARTUP_TIMEOUT, "munged's socket")

    def _spawn(self, name: str, command: list[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "wb")
        self._procs[name] = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()

    def _node_idle(self) -> bool:
        """Every node up (idle, mixed or allocated); nodes still down are resumed."""
        lines = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split("\n")
        states = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
        up = ("idle", "mixed", "allocated")
        for name, _ in self.nodes:
            if not states.get(name, "").startswith(up):
                self.run(["scontrol", "update", f"nodename={name}", "state=resume"], check=False)
        return len(states) == len(self.nodes) and all(states.get(n, "").startswith(up) for n, _ in self.nodes)

    def nodes_idle(self) -> bool:
        """Every node idle: no job on it and none still completing (a requeued job started on a
        node that still cleans up its previous run is refused: "Job credential revoked")."""
        lines = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split("\n")
        states = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
        return all(states.get(name) == "idle" for name, _ in self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{_tail(self.logs / f'{name}.stdout')}\n{self.diagnostics()}"
                    )
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")


if __name__ == "__main__":
    import tempfile

    ok, why = install_slurm()
    if not ok:
        sys.exit(f"cannot run SLURM here: {why}")
    with tempfile.TemporaryDirectory(prefix="hva-slurm-") as tmp, SlurmCluster(tmp) as cluster:
        print(f"export SLURM_CONF={cluster.conf}  # Ctrl-C to stop the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
