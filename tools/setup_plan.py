"""Decisions of tools/setup.sh, as pure functions it calls and tests check.

    python tools/setup_plan.py variant            # cpu or gpu
    python tools/setup_plan.py constraints        # the constraints file of that variant
    python tools/setup_plan.py mpi-identity       # one line naming the MPI on PATH
    python tools/setup_plan.py cuda-home          # the CUDA toolkit to compile with, or nothing
    python tools/setup_plan.py cache-key PYTHON   # the Horovod wheel cache key for that venv

Runs on the system Python (standard library only), before the virtual environment exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

TOOLS = Path(__file__).resolve().parent
HOROVOD_VERSION = "0.28.1"
VARIANTS = ("cpu", "gpu")


def variant(env: Mapping[str, str], nvidia_smi_works: bool) -> str:
    """``gpu`` when asked (``HVDAGENTS_GPU=1``) or when ``nvidia-smi`` answers, ``cpu`` when
    asked (``HVDAGENTS_GPU=0``) or otherwise."""
    asked = env.get("HVDAGENTS_GPU", "").strip()
    if asked not in ("", "0", "1"):
        raise ValueError(f"HVDAGENTS_GPU must be 0 or 1; got {asked!r}")
    if asked:
        return "gpu" if asked == "1" else "cpu"
    return "gpu" if nvidia_smi_works else "cpu"


def nvidia_smi_works() -> bool:
    """Whether ``nvidia-smi -L`` lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def constraints_file(which: str) -> Path:
    """The pinned versions of every Python dependency for ``cpu`` or ``gpu``."""
    if which not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {which!r}")
    return TOOLS / f"constraints-{which}.txt"


def mpi_compiler(env: Mapping[str, str]) -> Optional[str]:
    """The MPI C compiler wrapper: ``$MPICC``, else ``mpicc``, else Cray's ``cc`` (when
    ``CRAY_MPICH_DIR`` says Cray MPICH is loaded); ``None`` when there is none."""
    if env.get("MPICC"):
        return env["MPICC"]
    if shutil.which("mpicc", path=env.get("PATH")):
        return "mpicc"
    if env.get("CRAY_MPICH_DIR") and shutil.which("cc", path=env.get("PATH")):
        return "cc"
    return None


def describe_mpi(version_text: str) -> str:
    """``openmpi-4.1.4``, ``mpich-4.2.0``, ``intelmpi-2021.10``... from ``mpirun --version``
    (or an MPI library version string); ``unknown-<hash>`` when not recognised."""
    patterns = (
        (r"Open MPI\)?\s*v?(\d+\.\d+(?:\.\d+)?)", "openmpi"),
        (r"Intel\(R\) MPI Library.*?(\d{4}(?:\.\d+)*)", "intelmpi"),
        (r"MVAPICH2?\s*(?:Version:)?\s*(\d+\.\d+\w*)", "mvapich"),
        (r"(?:HYDRA|MPICH)[\s\S]*?[Vv]ersion:?\s*(\d+\.\d+(?:\.\d+)?\w*)", "mpich"),
    )
    for pattern, name in patterns:
        found = re.search(pattern, version_text)
        if found:
            return f"{name}-{found.group(1)}"
    digest = hashlib.sha256(version_text.encode()).hexdigest()[:8]
    return f"unknown-{digest}"


def mpi_identity(env: Mapping[str, str]) -> str:
    """``<mpi>@<sha of mpirun's path and version>``: changes when ``module swap`` changes the MPI."""
    mpirun = shutil.which("mpirun", path=env.get("PATH")) or shutil.which("mpiexec", path=env.get("PATH"))
    if mpirun is None:
        return "none"
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    digest = hashlib.sha256(f"{os.path.realpath(mpirun)}\n{text}".encode()).hexdigest()[:8]
    return f"{describe_mpi(text)}@{digest}"


def cache_key(*, torch: str, tensorflow: str, python: str, mpi: str, cuda: Optional[str],
              nccl: Optional[str], gpu_operations: Optional[str]) -> str:
    """The directory name of a cached Horovod wheel: every input that changes the binary."""
    parts = [f"horovod-{HOROVOD_VERSION}", f"torch-{torch}", f"tf-{tensorflow}", f"py{python}", f"mpi-{mpi}",
             f"cuda-{cuda or 'none'}", f"nccl-{nccl or 'none'}", f"gpuops-{gpu_operations or 'none'}"]
    key = "-".join(parts)
    return re.sub(r"[^A-Za-z0-9._+@-]", "_", key)


def nccl_version(nccl_home: Optional[str]) -> Optional[str]:
    """``2.29.7``: the version in ``$nccl_home/include/nccl.h``, the NCCL a build compiles and
    links against; ``None`` without a readable header. (Package metadata can mislead: torch's
    ``nvidia-nccl-cu13`` and TensorFlow's ``nvidia-nccl-cu12`` install the same
    ``nvidia/nccl`` files, and the one installed last is the one on disk.)"""
    if not nccl_home:
        return None
    try:
        header = (Path(nccl_home) / "include" / "nccl.h").read_text(errors="replace")
    except OSError:
        return None
    parts = [re.search(rf"^#define NCCL_{name}\s+(\d+)", header, re.MULTILINE) for name in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def _venv_versions(python: str) -> dict[str, str]:
    code = (
        "import sys, importlib.metadata as md\n"
        "def v(*names):\n"
        "    for n in names:\n"
        "        try:\n            return md.version(n)\n"
        "        except md.PackageNotFoundError:\n            pass\n"
        "    return 'none'\n"
        "print(v('torch')); print(v('tensorflow', 'tensorflow-cpu')); "
        "print(f'{sys.version_info.major}{sys.version_info.minor}'); print(v('nvidia-nccl-cu13', 'nvidia-nccl-cu12'))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return {"torch": out[0], "tensorflow": out[1], "python": out[2], "nccl": out[3]}


def cuda_home(env: Mapping[str, str]) -> Optional[str]:
    """The CUDA toolkit Horovod's GPU build compiles with: ``$CUDA_HOME`` when set, else the one
    holding the ``nvcc`` on ``PATH`` (``module load cuda``); ``None`` when neither, and set-up
    then installs NVIDIA's compiler packages from PyPI (``tools/cuda_from_pypi.sh``)."""
    if env.get("CUDA_HOME"):
        return env["CUDA_HOME"]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is None:
        return None
    # nvcc may be a wrapper script outside the toolkit (/usr/local/bin/nvcc -> exec .../cuda/bin/nvcc);
    # a dry run names the directory the real one runs from.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.TimeoutExpired):
        here = None
    return str(Path(here.group(1).strip()).parent) if here else str(Path(nvcc).parent.parent)


def _cuda_version(env: Mapping[str, str]) -> Optional[str]:
    home = cuda_home(env)
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    if nvcc is None or not nvcc.exists():
        return None
    found = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                             text=True, timeout=60).stdout)
    return found.group(1) if found else None


def main(argv: list[str]) -> int:
    env = os.environ
    command = argv[0] if argv else ""
    if command == "variant":
        print(variant(env, nvidia_smi_works()))
    elif command == "constraints":
        print(constraints_file(variant(env, nvidia_smi_works())))
    elif command == "mpi-identity":
        print(mpi_identity(env))
    elif command == "cuda-home":
        print(cuda_home(env) or "")
    elif command == "mpicc":
        print(mpi_compiler(env) or "")
    elif command == "cache-key" and len(argv) == 2:
        versions = _venv_versions(argv[1])
        gpu_ops = env.get("HOROVOD_GPU_OPERATIONS")
        print(cache_key(torch=versions["torch"], tensorflow=versions["tensorflow"], python=versions["python"],
                        mpi=mpi_identity(env), cuda=_cuda_version(env) if gpu_ops else None,
                        nccl=(nccl_version(env.get("HOROVOD_NCCL_HOME") or env.get("NCCL_HOME"))
                              or (versions["nccl"] if versions["nccl"] != "none" else env.get("NCCL_VERSION")))
                        if gpu_ops else None, gpu_operations=gpu_ops))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
