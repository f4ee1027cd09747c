"""Driver-side helpers shared by the benchmarks: MPI jobs with a hard timeout, the machine
record, statistics over repetitions, and JSON output.

Nothing here imports an ML framework: the driver stays light, and the frameworks load only in
the MPI workers it launches.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "REPO",
    "WORKERS",
    "DEFAULT_OUT",
    "RESULT_TAG",
    "JobFailed",
    "JobOutput",
    "run_mpi",
    "machine_info",
    "spread",
    "ratio_spread",
    "write_json",
    "read_json",
    "fmt_spread",
    "md_table",
    "pyplot",
    "save_figure",
]

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

#: Workers print their results on lines starting with this tag (rank 0 only).
RESULT_TAG = "BENCH"

#: Environment of every MPI job: quiet TensorFlow, one compute thread per rank (2 cores are
#: shared by up to 4 ranks), permission to run as root, and the repository importable.
JOB_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(REPO),
}

#: Resolution of the PNG plots (small files: under 200 KB each).
PLOT_DPI = 90

#: How much of a failed job's output goes into the error message.
_OUTPUT_TAIL = 4000


class JobFailed(RuntimeError):
    """An MPI job exited non-zero, timed out, or printed no result."""


@dataclass
class JobOutput:
    """A finished MPI job: its result objects (``RESULT_TAG`` lines) and its wall time."""

    results: list[dict[str, Any]]
    seconds: float


def run_mpi(worker: str, np_ranks: int, args: Sequence[str] = (), *, timeout: float,
            env: Mapping[str, str] | None = None, hosts: Any = None) -> JobOutput:
    """Run ``bench/workers/<worker>.py args`` on ``np_ranks`` local ranks under ``mpirun``, or
    spread evenly over ``hosts`` (:class:`hvdagents.testing.SimulatedHosts`).

    The job runs in its own process group and the whole group is killed after ``timeout``
    seconds (with every process in ``hosts``), so a hang fails the benchmark instead of the
    run. Raises :class:`JobFailed` with the tail of the output on a non-zero exit, a timeout
    or no result line.
    """
    mpirun = shutil.which("mpirun") or "mpirun"
    placement = ["--oversubscribe"] if hosts is None else ["-H", hosts.hosts_arg(np_ranks // hosts.count)]
    command = [mpirun, "-np", str(np_ranks), "--bind-to", "none", *placement,
               sys.executable, str(WORKERS / f"{worker}.py"), *args]
    if hosts is not None:
        command = [*hosts.enter(0), *command]
    full_env = dict(os.environ)
    full_env.update(JOB_ENV)
    if hosts is not None:
        full_env.update(hosts.env)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    if env:
        full_env.update(env)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=str(REPO), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        if hosts is not None:
            hosts.kill_all()
        stdout, stderr = proc.communicate()
        raise JobFailed(f"{worker} on {np_ranks} ranks timed out after {timeout:.0f} s\n"
                        f"{(stdout + stderr)[-_OUTPUT_TAIL:]}") from None
    seconds = time.monotonic() - started
    results = [json.loads(line[len(RESULT_TAG) + 1:]) for line in stdout.splitlines()
               if line.startswith(RESULT_TAG + " ")]
    if proc.returncode != 0 or not results:
        why = f"exited {proc.returncode}" if proc.returncode != 0 else "printed no result"
        raise JobFailed(f"{worker} on {np_ranks} ranks {why} after {seconds:.1f} s\n"
                        f"{(stdout + stderr)[-_OUTPUT_TAIL:]}")
    return JobOutput(results, seconds)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mpi_version() -> str:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return "unknown"
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {"horovod": "horovod", "torch": "torch", "tensorflow": "tensorflow-cpu", "keras": "keras",
             "mpi4py": "mpi4py", "numpy": "numpy"}
    found = {}
    for key, dist in names.items():
        for candidate in (dist, key):
            try:
                found[key] = version(candidate)
                break
            except PackageNotFoundError:
                continue
        else:
            found[key] = "not installed"
    return found


def machine_info() -> dict[str, Any]:
    """The machine and software the numbers were taken on (recorded in every JSON)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mpi": _mpi_version(),
        **_package_versions(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles of ``values`` (one per repetition)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("spread needs at least one value")
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(median), "min": float(arr.min()), "max": float(arr.max()),
            "q1": float(q1), "q3": float(q3), "n": int(arr.size)}


def ratio_spread(ours: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Spread of the per-repetition ratios ``ours[i] / base[i]`` (pairs run back to back)."""
    if len(ours) != len(base):
        raise ValueError(f"ratio_spread needs paired values; got {len(ours)} and {len(base)}")
    return spread([a / b for a, b in zip(ours, base)])


def fmt_spread(s: Mapping[str, float], digits: int = 3, scale: float = 1.0) -> str:
    """``median [min–max]`` with ``digits`` significant digits."""
    def f(x: float) -> str:
        return f"{x * scale:.{digits}g}"
    return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def write_json(out: Path, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (with the machine record added) to ``out/<name>.json``, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine_info(), **payload}
    _check_finite(data, name)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_json(out: Path, name: str) -> dict[str, Any] | None:
    """``out/<name>.json`` as a dict, or ``None`` when that benchmark has not been run."""
    path = out / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _check_finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number in benchmark output at {where}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (``|``-separated, header rule) from strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a small PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
