"""tools/setup_plan.py: the set-up's choices (variant, pins, MPI, cache key), and that
tools/setup.sh installs nothing its constraints file does not pin."""

import re
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import setup_plan as plan  # noqa: E402


@pytest.mark.parametrize("env, smi, expected", [
    ({}, False, "cpu"), ({}, True, "gpu"), ({"HVDAGENTS_GPU": "1"}, False, "gpu"),
    ({"HVDAGENTS_GPU": "0"}, True, "cpu"),
])
def test_variant_follows_the_gpu_or_the_request(env, smi, expected):
    assert plan.variant(env, smi) == expected


def test_a_bad_request_is_named():
    with pytest.raises(ValueError, match="HVDAGENTS_GPU must be 0 or 1; got 'yes'"):
        plan.variant({"HVDAGENTS_GPU": "yes"}, False)


def _pins(path):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.mark.parametrize("variant", plan.VARIANTS)
def test_every_package_setup_installs_is_pinned(variant):
    pins = _pins(plan.constraints_file(variant))
    script = (TOOLS / "setup.sh").read_text().replace("\\\n", " ")  # continuation lines joined
    installed = set()
    for line in re.findall(r"pip_install -c \"\$CONSTRAINTS\"([^\n]*)", script):
        for word in line.split("#")[0].split():
            word = word.strip('"')
            if word.startswith("-") or not re.match(r"^[A-Za-z]", word):
                continue
            installed.add(re.sub(r"\[.*\]", "", word).lower())
    framework = {"cpu": {"torch", "tensorflow-cpu"}, "gpu": {"torch", "tensorflow"}}[variant]
    wanted = (installed - {"torch", "tensorflow", "tensorflow-cpu"}) | framework
    assert {"mpi4py", "numpy", "pip", "setuptools"} <= wanted
    missing = sorted(n for n in wanted if re.sub(r"[-_.]+", "-", n) not in pins)
    assert not missing, f"{plan.constraints_file(variant).name} does not pin {missing}"


def test_the_cpu_pins_hold_the_frameworks_the_wheel_was_built_for():
    pins = _pins(plan.constraints_file("cpu"))
    assert pins["torch"] == "2.13.0" and pins["tensorflow-cpu"] == "2.21.0"


@pytest.mark.parametrize("text, expected", [
    ("mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/", "openmpi-4.1.4"),
    ("mpirun (Open MPI) 5.0.11", "openmpi-5.0.11"),
    ("HYDRA build details:\n    Version:                                 4.2.0", "mpich-4.2.0"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619", "intelmpi-2021.10"),
])
def test_the_mpi_is_named_from_its_version_text(text, expected):
    assert plan.describe_mpi(text) == expected


def test_an_unknown_mpi_still_gets_a_stable_distinct_name():
    a, b = plan.describe_mpi("some vendor mpi 1"), plan.describe_mpi("some vendor mpi 2")
    assert a.startswith("unknown-") and a != b and a == plan.describe_mpi("some vendor mpi 1")


def test_the_cache_key_changes_with_everything_that_changes_the_binary():
    base = dict(torch="2.13.0", tensorflow="2.21.0", python="311", mpi="openmpi-4.1.4@aa", cuda=None, nccl=None,
                gpu_operations=None)
    key = plan.cache_key(**base)
    assert key.startswith("horovod-0.28.1-torch-2.13.0-tf-2.21.0-py311-mpi-openmpi-4.1.4@aa")
    changes = {"torch": "2.12.0", "tensorflow": "2.20.0", "python": "312", "mpi": "mpich-4.2.0@bb",
               "cuda": "12.8", "nccl": "2.27.3", "gpu_operations": "NCCL"}
    keys = {plan.cache_key(**{**base, name: value}) for name, value in changes.items()}
    assert len(keys) == len(changes) and key not in keys
    assert "/" not in plan.cache_key(**{**base, "mpi": "a/b c"})  # a directory name


def test_the_mpi_compiler_is_mpicc_or_crays_cc(tmp_path):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    path = str(tmp_path)
    assert plan.mpi_compiler({"PATH": path}) is None  # no mpicc, not Cray
    assert plan.mpi_compiler({"PATH": path, "CRAY_MPICH_DIR": "/opt/cray/mpich"}) == "cc"
    assert plan.mpi_compiler({"PATH": path, "MPICC": "/x/mpicc"}) == "/x/mpicc"
    (tmp_path / "mpicc").write_text("#!/bin/sh\n")
    (tmp_path / "mpicc").chmod(0o755)
    assert plan.mpi_compiler({"PATH": path, "CRAY_MPICH_DIR": "/opt/cray/mpich"}) == "mpicc"


def test_cuda_comes_from_cuda_home_then_the_nvcc_on_path_then_nowhere(tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    on_path = {"PATH": f"/usr/bin:{toolkit / 'bin'}"}
    assert plan.cuda_home({"PATH": "/usr/bin:/bin"}) is None  # set-up then takes PyPI's packages
    assert plan.cuda_home(on_path) == str(toolkit)  # module load cuda
    assert plan.cuda_home({**on_path, "CUDA_HOME": "/opt/cuda-12.9"}) == "/opt/cuda-12.9"  # CUDA_HOME wins
    assert plan._cuda_version(on_path) == "13.0" and plan._cuda_version({"PATH": "/usr/bin"}) is None
    wrappers = tmp_path / "wrappers"  # /usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    wrappers.mkdir()
    (wrappers / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit / "bin" / "nvcc"} "$@"\n')
    (wrappers / "nvcc").chmod(0o755)
    (toolkit / "bin" / "nvcc").write_text(
        f"#!/bin/sh\ncase \"$1\" in --dryrun) echo '#$ _HERE_={toolkit / 'bin'}' >&2;; "
        "*) echo 'Cuda compilation tools, release 13.0, V13.0.88';; esac\n")
    assert plan.cuda_home({"PATH": f"{wrappers}:/usr/bin"}) == str(toolkit)


def test_the_nccl_version_is_the_one_in_the_header_the_build_compiles_against(tmp_path):
    (tmp_path / "include").mkdir()
    assert plan.nccl_version(str(tmp_path)) is None and plan.nccl_version(None) is None
    (tmp_path / "include" / "nccl.h").write_text(
        "#define NCCL_MAJOR 2\n#define NCCL_MINOR 32\n#define NCCL_PATCH 3\n#define NCCL_SUFFIX \"\"\n")
    assert plan.nccl_version(str(tmp_path)) == "2.32.3"


def _build_horovod(env_extra, tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "NCCL_HOME", "HOROVOD_NCCL_HOME")}
    env.update({"PATH": "/usr/bin:/bin", "PY": sys.executable, "HVDAGENTS_CACHE": str(tmp_path / "cache"),
                "HOROVOD_GPU_OPERATIONS": "NCCL", **env_extra})
    return subprocess.run(["bash", str(TOOLS / "build_horovod.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_gpu_build_without_cuda_or_nccl_stops_and_names_what_to_set(tmp_path):
    found = _build_horovod({}, tmp_path)
    assert found.returncode == 1 and "needs CUDA: set CUDA_HOME" in found.stderr
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    (cuda / "bin" / "nvcc").chmod(0o755)
    found = _build_horovod({"CUDA_HOME": str(cuda)}, tmp_path)  # this venv has no NCCL package
    assert found.returncode == 1 and "needs NCCL: set NCCL_HOME" in found.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing built
