#!/usr/bin/env bash
# Bring a fresh machine to a working hvdagents development environment.
#
#   tools/setup.sh            # idempotent; a second run with everything in place takes seconds
#
# Steps (each skipped when already done):
#   1. MPI: use the MPI on PATH (a cluster's `module load`); only when none is there and we are
#      root on Debian, install Open MPI from Debian's packages.
#   2. .venv/ with the pinned frameworks (torch CPU wheel, tensorflow-cpu, mpi4py, ...).
#   3. Horovod 0.28.1 built from its sdist with two source fixes (tools/build_horovod.sh),
#      the wheel cached under ~/.cache/hvdagents/ keyed by Horovod/torch/TF/Python versions.
#   4. hvdagents installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${HVDAGENTS_VENV:-$ROOT/.venv}
STAMP=$VENV/.hvdagents-setup-ok

TORCH_VERSION=2.13.0
TF_VERSION=2.21.0

log() { printf '[setup] %s\n' "$*" >&2; }
# pip, without the warnings this machine's pip configuration prints for absent local indexes.
pip_install() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither' || true; }; }

# --- 1. MPI -------------------------------------------------------------------------------
have_mpi() { command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; }
if ! have_mpi; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "no MPI on PATH and we are root: installing Open MPI from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    else
        log "ERROR: no MPI found (mpirun and mpicc must be on PATH)."
        log "On a cluster: 'module load' your site's MPI first. On your own Debian/Ubuntu box:"
        log "run this script as root, or 'apt-get install openmpi-bin libopenmpi-dev'."
        exit 1
    fi
fi

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
# Fast path: everything installed by an earlier run of the same recipe.
RECIPE_HASH=$(cat tools/setup.sh tools/build_horovod.sh setup.cfg | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE_HASH" ] \
   && "$PY" -c 'import horovod.torch, horovod.tensorflow, mpi4py, hvdagents' 2>/dev/null; then
    log "environment up to date ($VENV)"
    exit 0
fi

log "installing frameworks into $VENV"
pip_install --upgrade pip wheel 'setuptools<81'
pip_install "torch==$TORCH_VERSION" "tensorflow-cpu==$TF_VERSION"
# mpi4py compiles against the MPI found above.
pip_install mpi4py numpy scikit-learn pytest pytest-timeout tqdm matplotlib gymnasium ruff \
    cloudpickle psutil pyyaml packaging cffi

# --- 3. Horovod ---------------------------------------------------------------------------------
if ! "$PY" -c 'import horovod.torch, horovod.tensorflow' 2>/dev/null; then
    PY=$PY tools/build_horovod.sh
fi

# --- 4. hvdagents -----------------------------------------------------------------------------
pip_install --no-deps --no-build-isolation -e .
echo "$RECIPE_HASH" > "$STAMP"
log "done: $("$PY" -c 'import horovod, torch, tensorflow as tf, mpi4py; print("horovod", horovod.__version__, "torch", torch.__version__, "tf", tf.__version__, "mpi4py", mpi4py.__version__)' 2>/dev/null)"
