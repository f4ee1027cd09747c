#!/usr/bin/env bash
# Bring a fresh machine to a working hvdagents development environment.
#
#   tools/setup.sh            # idempotent; a second run with everything in place takes seconds
#
# Steps (each skipped when already done):
#   1. MPI: use the MPI on PATH (a cluster's `module load`; `mpicc`, or Cray's `cc`); only when
#      none is there and we are root on Debian, install Open MPI from Debian's packages.
#   2. .venv/ with every Python package pinned by tools/constraints-{cpu,gpu}.txt (the variant:
#      gpu where nvidia-smi lists a GPU or HVDAGENTS_GPU=1, else cpu); mpi4py compiled from
#      source against the MPI on PATH, again whenever that MPI changes (module swap).
#   3. Horovod 0.28.1 built from its sdist with two source fixes (tools/build_horovod.sh), with
#      NCCL for the gpu variant; the wheel cached under ~/.cache/hvdagents/ keyed by Horovod,
#      torch, TF, Python, the MPI, CUDA, NCCL and the GPU operations (tools/setup_plan.py).
#   4. hvdagents installed editable.
# Works as a non-root user when an MPI is on PATH (nothing is installed outside the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HVDAGENTS_VENV:-$ROOT/.venv}
STAMP=$VENV/.hvdagents-setup-ok


log() { printf '[setup] %s\n' "$*" >&2; }
# pip, without the warnings this machine's pip configuration prints for absent local indexes.
pip_install() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither' || true; }; }

# --- 1. MPI -------------------------------------------------------------------------------
PLAN="python3 tools/setup_plan.py"
have_mpi() { command -v mpirun >/dev/null 2>&1 && [ -n "$($PLAN mpicc)" ]; }
if ! have_mpi; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "no MPI on PATH and we are root: installing Open MPI from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    else
        log "ERROR: no MPI found (mpirun and mpicc, or Cray's cc, must be on PATH)."
        log "On a cluster: 'module load' your site's MPI first. On your own Debian/Ubuntu box:"
        log "run this script as root, or 'apt-get install openmpi-bin libopenmpi-dev'."
        exit 1
    fi
fi
MPICC=$($PLAN mpicc)
MPI_ID=$($PLAN mpi-identity)
VARIANT=$($PLAN variant)
CONSTRAINTS=$($PLAN constraints)

# iproute2: the multi-host tests build simulated hosts with `ip netns` (root only; else skipped)
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing iproute2 (simulated hosts for the multi-host tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

# --- 2. virtual environment ------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# Fast path: everything installed by an earlier run of the same recipe, MPI and variant.
RECIPE_HASH=$({ cat tools/setup.sh tools/build_horovod.sh tools/cuda_from_pypi.sh tools/setup_plan.py "$CONSTRAINTS" setup.cfg
                echo "$MPI_ID $VARIANT"; } | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE_HASH" ] \
   && "$PY" -c 'import horovod.torch, horovod.tensorflow, mpi4py, hvdagents' 2>/dev/null; then
    log "environment up to date ($VENV)"
    exit 0
fi

log "installing the $VARIANT set into $VENV (MPI: $MPI_ID; pins: $CONSTRAINTS)"
pip_install -c "$CONSTRAINTS" --upgrade pip wheel setuptools
if [ "$VARIANT" = gpu ]; then
    pip_install -c "$CONSTRAINTS" torch "tensorflow[and-cuda]"
    # A wheel folder in pip's configuration may hold torch's CPU build under the same version.
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
        log "ERROR: the gpu set needs torch's CUDA build, and pip installed $("$PY" -c 'import torch; print(torch.__version__)')"
        log "(a CPU build). 'pip config list' shows where it came from (find-links, an index); remove it"
        log "from $VENV ('$PY -m pip uninstall torch') and run set-up again without that setting."
        exit 1
    fi
else
    pip_install -c "$CONSTRAINTS" torch tensorflow-cpu
fi
pip_install -c "$CONSTRAINTS" numpy scikit-learn pytest pytest-timeout tqdm matplotlib gymnasium ruff \
    cloudpickle psutil pyyaml packaging cffi transformers  # transformers: test-only (library models)
# mpi4py compiled against the MPI on PATH (a binary wheel may load another libmpi than the one
# Horovod is built with); again, and Horovod rebuilt, when that MPI changed.
MPI_STAMP=$VENV/.hvdagents-mpi
if [ "$(cat "$MPI_STAMP" 2>/dev/null)" != "$MPI_ID" ]; then
    log "building mpi4py against $MPI_ID ($MPICC)"
    # --no-cache-dir: pip would reuse a wheel it built earlier against another MPI
    MPICC=$MPICC pip_install -c "$CONSTRAINTS" --force-reinstall --no-deps --no-cache-dir --no-binary mpi4py mpi4py
    "$PY" -m pip uninstall -q -y horovod 2>/dev/null || true
    echo "$MPI_ID" > "$MPI_STAMP"
fi

# --- 3. Horovod ---------------------------------------------------------------------------------
if ! "$PY" -c 'import horovod.torch, horovod.tensorflow' 2>/dev/null; then
    if [ "$VARIANT" = gpu ]; then
        export HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-NCCL}
        # CUDA: CUDA_HOME, else the nvcc on PATH (`module load cuda`), else NVIDIA's packages on PyPI.
        if [ -z "$($PLAN cuda-home)" ]; then
            log "no CUDA toolkit (CUDA_HOME, nvcc): installing NVIDIA's CUDA compiler packages into $VENV"
            CUDA_HOME=$(PY=$PY CONSTRAINTS=$CONSTRAINTS tools/cuda_from_pypi.sh)
            export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
        fi
    fi
    PY=$PY MPICC=$MPICC tools/build_horovod.sh
fi

# --- 4. hvdagents -----------------------------------------------------------------------------
pip_install --no-deps --no-build-isolation -e .
echo "$RECIPE_HASH" > "$STAMP"
log "done: $("$PY" -c 'import horovod, torch, tensorflow as tf, mpi4py; print("horovod", horovod.__version__, "torch", torch.__version__, "tf", tf.__version__, "mpi4py", mpi4py.__version__)' 2>/dev/null)"
