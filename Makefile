# hvdagents: every target installs what it needs first (tools/setup.sh is idempotent and fast
# when everything is in place).
PY     := .venv/bin/python
NP     ?= 2
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export TF_CPP_MIN_LOG_LEVEL := 3
export OMP_NUM_THREADS := 1
LAUNCH := $(PY) -m hvdagents launch -np $(NP) --oversubscribe

.PHONY: setup slurm-setup demo test lint bench gpu-wheel clean

setup:
	tools/setup.sh

# SLURM for the SLURM tests; exit 3 means "cannot install here" and the tests skip visibly.
slurm-setup:
	tools/setup_slurm.sh || [ $$? -eq 3 ]

demo: setup
	$(LAUNCH) examples/torch_digits.py --epochs 12
	$(LAUNCH) examples/keras_digits.py --epochs 12

test: setup slurm-setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check hvdagents tests examples bench

bench: setup
	$(PY) -m bench

# Horovod with NCCL, built here from PyPI's CUDA packages into .venv-gpu (no GPU needed to
# compile; ~3 GB, ~10 min; not part of CI). On a GPU cluster, `make setup` does the GPU build.
gpu-wheel:
	tools/build_gpu_wheel.sh

clean:
	rm -rf build *.egg-info .pytest_cache
