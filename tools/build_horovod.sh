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
#   4. TensorFlow GPU ops: the CUDA stream of a TF stream from Stream::platform_specific_handle()
#      instead of stream_executor::gpu::AsGpuStreamValue, which TF 2.21 no longer exports (the
#      library built, then failed to load: "undefined symbol ...AsGpuStreamValue..."). GPU only.
set -euo pipefail
PY=${PY:-python3}
HOROVOD_VERSION=0.28.1
CACHE=${HVDAGENTS_CACHE:-$HOME/.cache/hvdagents}

TOOLS=$(cd "$(dirname "$0")" && pwd)
if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
    CUDA_HOME=$(python3 "$TOOLS/setup_plan.py" cuda-home); export CUDA_HOME
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
# Whether this venv has TensorFlow (both for set-up's venvs; torch alone for the GPU proof,
# tools/build_gpu_wheel.sh): what is built, and which bindings must load.
has_tensorflow=0
if "$PY" -c 'import tensorflow' >/dev/null 2>&1; then has_tensorflow=1; fi
wheel_dir=$CACHE/$key
mkdir -p "$CACHE"

build_wheel() {
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

    # Fix 4 (TensorFlow GPU ops only): the stream handle through the Stream interface.
    "$PY" - "$src/horovod/tensorflow/mpi_ops.cc" <<'PYEOF'
import sys
path = sys.argv[1]
text = open(path).read()
declaration = ("namespace stream_executor {\nnamespace gpu {\n"
               "GpuStreamHandle AsGpuStreamValue(Stream* stream);\n"
               "} // namespace stream_executor\n} // namespace gpu\n")
include_end = "#endif // TENSORFLOW_VERSION >= 2011000000\n"
definition = ("namespace stream_executor {\nnamespace gpu {\n"
              "inline GpuStreamHandle AsGpuStreamValue(Stream* stream) {\n"
              "  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n"
              "}\n} // namespace gpu\n} // namespace stream_executor\n")
if text.count(declaration) != 1 or text.count(include_end) != 1:
    sys.exit("[build_horovod] patch 4 did not apply: mpi_ops.cc is not the expected 0.28.1 source")
open(path, "w").write(text.replace(declaration, "").replace(include_end, include_end + definition))
PYEOF

    frameworks=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1)
    if [ "$has_tensorflow" = 0 ]; then
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
}

# Install the wheel; every binding the venv's frameworks need must load (a library that built
# but does not load, an undefined symbol, must stop set-up rather than pass it).
install_checked() {
    "$PY" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
    local bindings=horovod.torch binding err
    if [ "$has_tensorflow" = 1 ]; then bindings="$bindings horovod.tensorflow"; fi
    for binding in $bindings; do
        if ! err=$("$PY" -c "import $binding" 2>&1); then
            echo "[build_horovod] $binding from $(ls "$wheel_dir"/horovod-*.whl) does not load:" >&2
            echo "$err" | tail -n 3 >&2
            return 1
        fi
    done
}

built=0
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    build_wheel
    built=1
fi
if ! install_checked; then
    [ "$built" = 1 ] && exit 1
    echo "[build_horovod] discarding that cached wheel and building it again" >&2
    rm -rf "$wheel_dir"
    build_wheel
    install_checked || exit 1
fi
echo "[build_horovod] installed $(ls "$wheel_dir"/horovod-*.whl)" >&2
