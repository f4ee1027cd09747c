"""Single-process tests of the runtime's pure parts: launcher detection and checks, sharding,
GPU choice, model comparison, atomic writes."""

import os

import numpy as np
import pytest

import hvdagents as hva
from hvdagents.agent import check_same_model
from hvdagents.checkpoint import write_atomic
from hvdagents.devices import gpu_for_local_rank
from hvdagents.runtime import check_launch, detect_launcher

MPIRUN_ENV = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "x"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "python"),
        (MPIRUN_ENV, "mpirun"),
        ({**MPIRUN_ENV, "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "^openib"}, "horovodrun"),
        ({"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_SIZE": "2"}, "horovodrun-gloo"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "PMIX_RANK": "1"}, "srun"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", **MPIRUN_ENV}, "mpirun"),  # mpirun inside an allocation
        ({"PMI_SIZE": "2", "PMI_RANK": "0"}, "mpiexec"),
    ],
)
def test_detect_launcher(env, expected):
    assert detect_launcher(env) == expected


def test_srun_without_pmix_is_refused_with_the_fix():
    with pytest.raises(hva.LauncherError, match=r"SLURM started 4 tasks.*srun --mpi=pmix"):
        check_launch({"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2"}, mpi_size=1)


def test_srun_without_pmix_is_caught_before_mpi_init():
    step = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}
    with pytest.raises(hva.LauncherError, match="srun --mpi=pmix"):
        check_launch(step, mpi_size=None)
    check_launch({**step, "PMIX_RANK": "1"}, mpi_size=None)  # srun --mpi=pmix
    check_launch({**step, "OMPI_COMM_WORLD_SIZE": "4"}, mpi_size=None)  # mpirun inside an allocation


def test_srun_with_pmix_and_single_task_steps_pass():
    check_launch({"SLURM_STEP_NUM_TASKS": "4"}, mpi_size=4)
    check_launch({"SLURM_STEP_NUM_TASKS": "1"}, mpi_size=1)
    check_launch({"SLURM_NTASKS": "8"}, mpi_size=1)  # a batch script running python directly


def test_horovod_env_without_mpi_world_is_refused_unless_gloo():
    with pytest.raises(hva.LauncherError, match=r"Horovod's environment says 2 ranks.*horovodrun --mpi"):
        check_launch({"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, mpi_size=1)
    check_launch({"HOROVOD_SIZE": "2", "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1"}, mpi_size=1)
    with pytest.raises(hva.LauncherError, match="two launchers"):
        check_launch({"HOROVOD_SIZE": "2"}, mpi_size=4)


@pytest.mark.parametrize("size", range(1, 8))
@pytest.mark.parametrize("n", [0, 1, 6, 7, 13, 100])
def test_shard_covers_every_item_exactly_once(size, n):
    pieces = [hva.shard(n, rank=r, size=size) for r in range(size)]
    assert [i for piece in pieces for i in piece] == list(range(n))
    lengths = [len(p) for p in pieces]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    data = np.arange(n * 2).reshape(n, 2)
    assert np.array_equal(np.concatenate([hva.shard(data, rank=r, size=size) for r in range(size)]), data)
    letters = [chr(65 + i % 26) for i in range(n)]
    assert sum((hva.shard(letters, rank=r, size=size) for r in range(size)), []) == letters


def test_shard_rejects_bad_input():
    with pytest.raises(ValueError, match="rank must be in"):
        hva.shard(10, rank=3, size=3)
    with pytest.raises(TypeError, match="item count, an array or a sequence"):
        hva.shard(3.5, rank=0, size=1)


def test_shard_defaults_to_this_process_world_of_one():
    assert list(hva.shard(5)) == list(range(5))


@pytest.mark.parametrize(
    "local_rank, local_size, visible, expected",
    [(0, 1, 0, None), (3, 4, 0, None), (2, 4, 1, 0), (0, 4, 4, 0), (3, 4, 4, 3), (1, 2, 8, 1)],
)
def test_gpu_for_local_rank(local_rank, local_size, visible, expected):
    assert gpu_for_local_rank(local_rank, local_size, visible) == expected


def test_gpu_sharing_warns():
    with pytest.warns(RuntimeWarning, match="shares GPU 1"):
        assert gpu_for_local_rank(3, 4, 2) == 1


def test_check_same_model_names_first_difference_and_ranks():
    a = [("fc.weight", (4, 8), "float32"), ("fc.bias", (4,), "float32")]
    b = [("fc.weight", (6, 8), "float32"), ("fc.bias", (6,), "float32")]
    check_same_model([a, a, a])
    with pytest.raises(hva.ModelMismatchError, match=r"'fc.weight' has shape \(4, 8\) float32 on rank 0 but "
                                                       r"shape \(6, 8\) float32 on rank\(s\) 1, 3"):
        check_same_model([a, b, a, b])
    with pytest.raises(ValueError, match="rank 0 has parameter 'fc.bias' that rank"):
        check_same_model([a, a[:1]])
    with pytest.raises(ValueError, match=r"float64 on rank\(s\) 1"):
        check_same_model([a, [("fc.weight", (4, 8), "float64"), a[1]]])


def test_write_atomic_replaces_whole_or_leaves_old(tmp_path):
    target = tmp_path / "ckpt.bin"
    write_atomic(target, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.bin"]  # no temporary left behind
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


def test_context_in_plain_python():
    ctx = hva.init()
    assert (ctx.rank, ctx.size, ctx.is_root, ctx.launcher) == (0, 1, True, "python")
    assert hva.init() is ctx and hva.context() is ctx


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: hva.Sync(compression="int8"), "Sync.compression"),
        (lambda: hva.Sync(backward_passes_per_step=0), "Sync.backward_passes_per_step"),
        (lambda: hva.LocalSGD(period=0), "LocalSGD.period"),
        (lambda: hva.Downpour(period=0), "Downpour.period"),
        (lambda: hva.Downpour(max_staleness=-1), "Downpour.max_staleness"),
        (lambda: hva.EASGD(alpha=1.5), r"EASGD.alpha must be in \(0, 1\); got 1.5"),
        (lambda: hva.EASGD(alpha=0.0), "EASGD.alpha"),
        (lambda: hva.EASGD(period=0), "EASGD.period"),
        (lambda: hva.Gossip(period=0), "Gossip.period"),
        (lambda: hva.Gossip(max_staleness=-2), "Gossip.max_staleness"),
        (lambda: hva.Gossip(weights=[[0.5, 0.2], [0.5, 0.5]]), "Gossip.weights must be doubly stochastic"),
        (lambda: hva.Gossip(weights=[[1.0, 0.0]]), "Gossip.weights must be a square"),
        (lambda: hva.Gossip(weights=[[1.5, -0.5], [0.5, 0.5]]), "non-negative"),
    ],
)
def test_bad_strategy_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_strategies_are_frozen():
    s = hva.EASGD(alpha=0.2)
    with pytest.raises(AttributeError):
        s.alpha = 0.3  # type: ignore[misc]
    assert hva.Gossip(weights=[[0.5, 0.5], [0.5, 0.5]]).matrix(2).shape == (2, 2)
    with pytest.raises(ValueError, match="must be 4x4 for 4 ranks"):
        hva.Gossip(weights=[[0.5, 0.5], [0.5, 0.5]]).matrix(4)


def test_import_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, hvdagents; "
            "print('mpi4py.MPI' in sys.modules, 'torch' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ)).stdout
    assert out.split() == ["False", "False", "False"]


def test_the_quiet_import_drops_only_tensorflows_start_up_notices(capfd):
    import os
    import types

    from hvdagents.quiet import _QuietLoader

    class Noisy:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
            os.write(2, b"I0000 00:00:1796399246.377566   17119 port.cc:153] oneDNN custom operations are on.\n")
            os.write(2, b"E0000 real trouble while importing\n")
            raise ImportError("the import failed")

    try:
        _QuietLoader(Noisy()).exec_module(types.ModuleType("tensorflow"))
    except ImportError:
        pass
    else:
        raise AssertionError("the loader swallowed the import's exception")
    err = capfd.readouterr().err
    assert err == "E0000 real trouble while importing\n"
