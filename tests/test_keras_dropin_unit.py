"""``import hvdagents.keras as hvd`` is Horovod's Keras API (horovod.tensorflow.keras 0.28.1):
every name is there, with Horovod's arguments in Horovod's order and defaults, and importing it
starts neither MPI nor Horovod (one process)."""

import inspect
import subprocess
import sys

import pytest

from mpirun import job_env

#: Horovod 0.28.1's signatures (horovod/tensorflow/keras/__init__.py, callbacks.py,
#: horovod/common/basics.py): name -> [(argument, default or REQUIRED)].
REQUIRED = object()
HOROVOD = {
    "init": [("comm", None), ("process_sets", None)],
    "shutdown": [], "is_initialized": [], "size": [], "rank": [], "local_rank": [], "local_size": [],
    "cross_rank": [], "cross_size": [],
    "allreduce": [("value", REQUIRED), ("name", None), ("average", None), ("prescale_factor", 1.0),
                  ("postscale_factor", 1.0), ("op", None), ("compression", None)],
    "allgather": [("value", REQUIRED), ("name", None)],
    "broadcast": [("value", REQUIRED), ("root_rank", REQUIRED), ("name", None)],
    "broadcast_variables": [("variables", REQUIRED), ("root_rank", REQUIRED)],
    "load_model": [("filepath", REQUIRED), ("custom_optimizers", None), ("custom_objects", None),
                   ("compression", None)],
    "DistributedOptimizer": [("optimizer", None), ("name", None), ("device_dense", ""), ("device_sparse", ""),
                             ("compression", None), ("sparse_as_dense", False), ("gradient_predivide_factor", 1.0),
                             ("op", None), ("backward_passes_per_step", 1), ("average_aggregated_gradients", False),
                             ("num_groups", 0), ("groups", None), ("process_set", None),
                             ("scale_local_gradients", True)],
    "callbacks.BroadcastGlobalVariablesCallback": [("root_rank", 0), ("device", ""), ("local_variables", None)],
    "callbacks.MetricAverageCallback": [("device", "")],
    "callbacks.LearningRateScheduleCallback": [("initial_lr", REQUIRED), ("multiplier", REQUIRED), ("start_epoch", 0),
                                               ("end_epoch", None), ("staircase", True),
                                               ("momentum_correction", True), ("steps_per_epoch", None)],
    "callbacks.LearningRateWarmupCallback": [("initial_lr", REQUIRED), ("warmup_epochs", 5),
                                             ("momentum_correction", True), ("steps_per_epoch", None),
                                             ("verbose", 0)],
    "callbacks.BestModelCheckpoint": [("monitor", "val_loss"), ("verbose", 0), ("save_weights_only", False),
                                      ("mode", "auto"), ("save_freq", "epoch")],
}


def _resolve(name):
    import hvdagents.keras as hvd

    obj = hvd
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(HOROVOD))
def test_the_name_takes_horovods_arguments_in_horovods_order(name):
    obj = _resolve(name)
    params = [p for p in inspect.signature(obj).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    ours = [(p.name, REQUIRED if p.default is p.empty else p.default) for p in params]
    # Horovod's Compression.none / global_process_set / Average are None-like defaults here
    assert ours == HOROVOD[name], f"{name}: ours {ours}"


def test_horovods_constants_and_compression_are_there():
    import horovod.tensorflow as htf

    import hvdagents.keras as hvd

    assert hvd.Compression.none is None and hvd.Compression.fp16 == "fp16"
    assert (hvd.Average, hvd.Sum) == (htf.Average, htf.Sum) and hvd.Average != hvd.Sum


def test_importing_the_drop_in_starts_neither_mpi_nor_horovod():
    code = ("import sys, hvdagents.keras as hvd; "
            "mpi = sys.modules.get('mpi4py.MPI'); "
            "print('MPI', bool(mpi and mpi.Is_initialized()), 'HVD', 'horovod.tensorflow' in sys.modules, "
            "'INIT', hvd.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MPI False HVD False INIT False" in out.stdout


def test_names_before_init_raise_horovods_error():
    code = "import hvdagents.keras as hvd\ntry:\n    hvd.size()\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True, timeout=120)
    assert "Horovod has not been initialized; use hvd.init()." in out.stdout, out.stderr
