#!/usr/bin/env bash
# Proof of the GPU build on a machine without a GPU (compiling needs none): `make gpu-wheel`.
# Not part of CI or set-up: about 3 GB of wheels and a 10-minute build.
#
# A separate venv (.venv-gpu, or $HVDAGENTS_GPU_VENV) gets the CUDA build of torch pinned in
# tools/constraints-gpu.txt (with its NCCL, nvidia-nccl-cu13) and NVIDIA's CUDA 13 compiler
# packages from PyPI (nvcc, runtime, CCCL and CRT headers, NVVM), which install one CUDA tree
# under site-packages/nvidia/cu13. tools/build_horovod.sh then builds Horovod with
# HOROVOD_GPU_OPERATIONS=NCCL against it (CUDA_HOME = that tree; NCCL from the venv), cached
# like every other build, and `horovodrun --check-build` shows what was built.
# On a GPU cluster use tools/setup.sh instead (HVDAGENTS_GPU=1, or a GPU that nvidia-smi lists).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${HVDAGENTS_GPU_VENV:-$ROOT/.venv-gpu}
CONSTRAINTS=$ROOT/tools/constraints-gpu.txt
#: GPU architectures compiled (Hopper and Ampere; Horovod's default is every one nvcc knows).
export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}
log() { echo "[gpu-wheel] $*" >&2; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
# Not a local wheel folder from pip's configuration: one may hold torch's CPU build under the
# same version (this machine's does).
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null
pip_install() { "$PY" -m pip install -q "$@"; }
log "installing torch (CUDA build) into $VENV"
pip_install -c "$CONSTRAINTS" --upgrade pip wheel setuptools
pip_install -c "$CONSTRAINTS" torch numpy cloudpickle psutil pyyaml packaging cffi
MPICC=${MPICC:-mpicc} pip_install -c "$CONSTRAINTS" --no-cache-dir --no-binary mpi4py mpi4py
"$PY" - <<'PYEOF'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build: the GPU wheel needs the CUDA one"
print(f"[gpu-wheel] torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

# The CUDA 13 compiler from PyPI, as set-up does on a machine without a CUDA toolkit.
CUDA_HOME=$(PY=$PY CONSTRAINTS=$CONSTRAINTS "$ROOT/tools/cuda_from_pypi.sh")
export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

HOROVOD_GPU_OPERATIONS=NCCL PY=$PY "$ROOT/tools/build_horovod.sh"
log "horovodrun --check-build:"
PATH=$VENV/bin:$PATH "$VENV/bin/horovodrun" --check-build
"$PY" -c 'import horovod.torch as hvd; assert hvd.nccl_built(), "NCCL not built"; print("[gpu-wheel] nccl_built:", hvd.nccl_built(), "cuda_built:", hvd.cuda_built())'
