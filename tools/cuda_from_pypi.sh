#!/usr/bin/env bash
# A CUDA toolkit for Horovod's NCCL build, from NVIDIA's packages on PyPI, when the machine has
# none (no CUDA_HOME, no nvcc on PATH): compiling needs no GPU and no root.
#
#   CUDA_HOME=$(PY=.venv/bin/python CONSTRAINTS=tools/constraints-gpu.txt tools/cuda_from_pypi.sh)
#
# Installs nvcc, its CRT and CCCL headers and NVVM (versions pinned in $CONSTRAINTS: CUDA 13.0,
# torch's own) into $PY's environment; they form one CUDA tree under site-packages/nvidia/cu13,
# the runtime (nvidia-cuda-runtime, torch's dependency) included. Adds the two links CMake and
# nvcc look for (lib64/, an unversioned libcudart.so) and prints the tree's path.
set -euo pipefail
PY=${PY:?PY must name the python of the venv}
CONSTRAINTS=${CONSTRAINTS:?CONSTRAINTS must name the constraints file}
"$PY" -m pip install -q -c "$CONSTRAINTS" nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-cccl nvidia-nvvm >&2
CUDA_HOME=$("$PY" -c 'import nvidia, pathlib; print(pathlib.Path(nvidia.__path__[0]) / "cu13")')
if [ ! -x "$CUDA_HOME/bin/nvcc" ] || [ ! -e "$CUDA_HOME/lib/libcudart.so.13" ]; then
    echo "[cuda_from_pypi] no CUDA 13 tree with bin/nvcc and lib/libcudart.so.13 under $CUDA_HOME" >&2
    exit 1
fi
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
[ -e "$CUDA_HOME/lib/libcudart.so" ] || ln -s libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
echo "$CUDA_HOME"
