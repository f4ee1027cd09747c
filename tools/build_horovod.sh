#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist for the frameworks installed in $PY's environment,
# and install it. The built wheel is cached under ~/.cache/hvdagents/ keyed by everything that
# changes the binary (Horovod, torch, TensorFlow, Python, the MPI, CUDA, NCCL, the GPU
# operations: tools/setup_plan.py cache-key), so later runs (and other clones) skip the build.
#
# GPU: HOROVOD_GPU_OPERATIONS=NCCL builds the NCCL all-reduce. CUDA comes from CUDA_HOME or the
# nvcc on PATH; NCCL from NCCL_HOME (or HOROVOD_NCCL_HOME), else from the framework's NCCL
# package in the venv (nvidia-nccl-cu12/cu13). Missing either is an error naming what to set.
#
# Horovod 0.28.1 (June 2023) is the newest release; its sdist does not build against current
# frameworks as-is. The fixes below are the whole difference from upstream:
#   1. C++14 -> C++17 in CMakeLists.txt and horovod/torch/CMakeLists.txt
#      (torch >= 2.1 headers need C++17; fixed upstream after the release, never released).
#   2. Drop xla_mpi_ops.cc from horovod/tensorflow/CMakeLists.txt
#      (TF 2.21's XLA headers include files the wheel does not ship; the XLA ops are optional).
#   3. CUDA kernels in C++17 instead of C++11 (nvcc 13 refuses C++11; unused without CUDA).
set -euo pipefail
PY=${PY:-python3}
HOROVOD_VERSION=0.28.1
CACHE=${HVDAGENTS_CACHE:-$HOME/.cache/hvdagents}

TOOLS=$(cd "$(dirname "$0")" && pwd)
if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME
    fi
    if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        echo "[build_horovod] HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS needs CUDA: set CUDA_HOME to a CUDA" \
             "toolkit (with bin/nvcc), or 'module load cuda'" >&2
        exit 1
    fi
    # the venv's NCCL (torch's CUDA 13 one first): the directory above lib/libnccl.so*
    NCCL_HOME=${HOROVOD_NCCL_HOME:-${NCCL_HOME:-$("$PY" - <<'PYEOF' 2>/dev/null || true
import glob, os, sysconfig
found = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "**", "libnccl.so*"), recursive=True),
               key=lambda p: ("cu13" not in p, p))
print(os.path.dirname(os.path.dirname(found[0])) if found else "")
PYEOF
)}}
    if [ -z "$NCCL_HOME" ] || ! ls "$NCCL_HOME"/lib/libnccl.so* >/dev/null 2>&1; then
        echo "[build_horovod] HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS needs NCCL: set NCCL_HOME (with" \
             "lib/libnccl.so), or install the framework's NCCL package (nvidia-nccl-cu12) into the venv" >&2
        exit 1
    fi
    # The pip NCCL ships only libnccl.so.2; Horovod's CMake links by the unversioned name.
    if [ ! -e "$NCCL_HOME/lib/libnccl.so" ] && [ -e "$NCCL_HOME/lib/libnccl.so.2" ] && [ -w "$NCCL_HOME/lib" ]; then
        ln -s libnccl.so.2 "$NCCL_HOME/lib/libnccl.so"
    fi
    export HOROVOD_NCCL_HOME=$NCCL_HOME HOROVOD_CUDA_HOME=$CUDA_HOME
fi
key=$(python3 "$TOOLS/setup_plan.py" cache-key "$PY")
wheel_dir=$CACHE/$key
mkdir -p "$CACHE"

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "[build_horovod] building $key (about 10 minutes on 2 cores)" >&2
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src=$work/horovod-$HOROVOD_VERSION

    # Fix 1: C++17 (torch >= 2.1).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    # Fix 2: no XLA ops against TF 2.21's incomplete XLA headers.
    sed -i '/xla_mpi_ops\.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
    if grep -q 'xla_mpi_ops' "$src/horovod/tensorflow/CMakeLists.txt"; then
        echo "[build_horovod] patch 2 did not apply" >&2; exit 1
    fi

    # Fix 3 (CUDA builds only): nvcc >= 13 rejects the kernels' C++11; C++17 as for the rest.
    sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$src/horovod/common/ops/cuda/CMakeLists.txt"
    grep -q 'CMAKE_CUDA_STANDARD 17' "$src/horovod/common/ops/cuda/CMakeLists.txt"

    # The frameworks this venv has: both for set-up's venvs; torch alone for the GPU proof
    # (tools/build_gpu_wheel.sh), whose venv has no TensorFlow.
    frameworks=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1)
    if ! "$PY" -c 'import tensorflow' >/dev/null 2>&1; then
        frameworks=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1)
    fi
    tmp_out=$work/wheel
    env "${frameworks[@]}" HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps "$src" -w "$tmp_out"
    # Publish atomically so a killed build never leaves a half-written cache entry.
    mkdir -p "$wheel_dir.tmp.$$"
    mv "$tmp_out"/horovod-*.whl "$wheel_dir.tmp.$$/"
    mv -T "$wheel_dir.tmp.$$" "$wheel_dir"
fi
"$PY" -m pip install -q --no-deps "$wheel_dir"/horovod-*.whl
echo "[build_horovod] installed $(ls "$wheel_dir"/horovod-*.whl)" >&2
