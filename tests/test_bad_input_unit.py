"""Bad input in one process: every public constructor, the ``HVDAGENTS_*`` settings and
``hvdagents launch``'s arguments, tried with wrong types and out-of-range values. Each row is
(what, how it is called, the exception type, words its message must hold: the field's name and
the value received). Values that differ between ranks: :func:`agreement_error` and the agent's
difference message here, the real thing on 2 ranks in ``tests/test_bad_input_mpi.py``."""

import sys
from pathlib import Path

import numpy as np
import pytest

import hvdagents as hva
from hvdagents import horovod_settings, launch
from hvdagents.agent import _agent_difference
from hvdagents.collectives import agreement_error
from hvdagents.data import shard
from hvdagents.errors import UsageError
from hvdagents.launch import LaunchSpec, build_command, parse_hosts
from hvdagents.strategies.windows.relay import window_mode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import setup_plan  # noqa: E402

nan = float("nan")

#: (what, call, exception type, words the message must hold).
CASES = [
    # strategies: frozen dataclasses checked in __post_init__
    ("Sync.compression", lambda: hva.Sync(compression="zip"), ValueError, ["Sync.compression", "'zip'"]),
    ("Sync.compression type", lambda: hva.Sync(compression=16), ValueError, ["Sync.compression", "16"]),
    ("Sync.nonfinite", lambda: hva.Sync(nonfinite="skip"), ValueError, ["Sync.nonfinite", "'skip'"]),
    ("Sync.backward_passes_per_step range", lambda: hva.Sync(backward_passes_per_step=0), ValueError,
     ["Sync.backward_passes_per_step", ">= 1", "0"]),
    ("Sync.backward_passes_per_step type", lambda: hva.Sync(backward_passes_per_step="2"), TypeError,
     ["Sync.backward_passes_per_step", "'2'"]),
    ("LocalSGD.period range", lambda: hva.LocalSGD(period=0), ValueError, ["LocalSGD.period", "0"]),
    ("LocalSGD.period float", lambda: hva.LocalSGD(period=2.0), TypeError, ["LocalSGD.period", "2.0"]),
    ("LocalSGD.period bool", lambda: hva.LocalSGD(period=True), TypeError, ["LocalSGD.period", "bool"]),
    ("Downpour.period", lambda: hva.Downpour(period=-1), ValueError, ["Downpour.period", "-1"]),
    ("Downpour.max_staleness", lambda: hva.Downpour(max_staleness=-1), ValueError, ["Downpour.max_staleness", "-1"]),
    ("Downpour.max_staleness type", lambda: hva.Downpour(max_staleness=1.5), TypeError,
     ["Downpour.max_staleness", "1.5"]),
    ("Downpour.normalize", lambda: hva.Downpour(normalize=1), TypeError, ["Downpour.normalize", "1"]),
    ("Downpour.staleness_aware", lambda: hva.Downpour(staleness_aware="yes"), TypeError,
     ["Downpour.staleness_aware", "'yes'"]),
    ("EASGD.alpha type", lambda: hva.EASGD(alpha="0.1"), TypeError, ["EASGD.alpha", "'0.1'"]),
    ("EASGD.alpha 0", lambda: hva.EASGD(alpha=0), ValueError, ["EASGD.alpha", "(0, 1)", "0"]),
    ("EASGD.alpha 1.5", lambda: hva.EASGD(alpha=1.5), ValueError, ["EASGD.alpha", "1.5"]),
    ("EASGD.alpha nan", lambda: hva.EASGD(alpha=nan), ValueError, ["EASGD.alpha", "nan"]),
    ("EASGD.alpha inf", lambda: hva.EASGD(alpha=float("inf")), ValueError, ["EASGD.alpha", "inf"]),
    ("EASGD.period", lambda: hva.EASGD(period=0), ValueError, ["EASGD.period", "0"]),
    ("EASGD.max_staleness", lambda: hva.EASGD(max_staleness=-2), ValueError, ["EASGD.max_staleness", "-2"]),
    ("Gossip.period", lambda: hva.Gossip(period=0), ValueError, ["Gossip.period", "0"]),
    ("Gossip.seed type", lambda: hva.Gossip(seed="x"), TypeError, ["Gossip.seed", "'x'"]),
    ("Gossip.seed float", lambda: hva.Gossip(seed=1.5), TypeError, ["Gossip.seed", "1.5"]),
    ("Gossip.seed range", lambda: hva.Gossip(seed=-1), ValueError, ["Gossip.seed", ">= 0", "-1"]),
    ("Gossip.max_staleness", lambda: hva.Gossip(max_staleness=-1), ValueError, ["Gossip.max_staleness", "-1"]),
    ("Gossip.weights text", lambda: hva.Gossip(weights="ab"), ValueError, ["Gossip.weights", "matrix"]),
    ("Gossip.weights scalar", lambda: hva.Gossip(weights=5), ValueError, ["Gossip.weights", "square", "()"]),
    ("Gossip.weights not square", lambda: hva.Gossip(weights=[[1.0, 0.0]]), ValueError,
     ["Gossip.weights", "square", "(1, 2)"]),
    ("Gossip.weights nan", lambda: hva.Gossip(weights=[[0.5, 0.5], [0.5, nan]]), ValueError,
     ["Gossip.weights", "finite"]),
    ("Gossip.weights negative", lambda: hva.Gossip(weights=[[2.0, -1.0], [-1.0, 2.0]]), ValueError,
     ["Gossip.weights", "non-negative"]),
    ("Gossip.weights not doubly stochastic", lambda: hva.Gossip(weights=[[1.0, 0.0], [1.0, 0.0]]), ValueError,
     ["Gossip.weights", "doubly stochastic", "column 0", "2"]),
    ("Gossip.weights for another world size", lambda: hva.Gossip(weights=[[1.0]]).matrix(2), ValueError,
     ["Gossip.weights", "2x2", "1x1"]),
    # data.shard
    ("shard rank float", lambda: shard(10, rank=1.5, size=2), TypeError, ["rank", "1.5"]),
    ("shard rank bool", lambda: shard(10, rank=True, size=2), TypeError, ["rank", "bool"]),
    ("shard size text", lambda: shard(10, rank=0, size="2"), TypeError, ["size", "'2'"]),
    ("shard size 0", lambda: shard(10, rank=0, size=0), ValueError, ["size", ">= 1", "0"]),
    ("shard rank out of range", lambda: shard(10, rank=2, size=2), ValueError, ["rank", "[0, 2)", "2"]),
    ("shard negative count", lambda: shard(-1, rank=0, size=2), ValueError, ["number of items", "-1"]),
    ("shard float count", lambda: shard(3.5, rank=0, size=1), TypeError, ["item count", "float"]),
    ("shard None", lambda: shard(None, rank=0, size=1), TypeError, ["item count", "NoneType"]),
    # hva.init's Horovod settings (recorded before Horovod starts)
    ("init autotune", lambda: horovod_settings.requested(autotune="yes"), TypeError, ["autotune", "'yes'"]),
    ("init timeline empty", lambda: horovod_settings.requested(timeline=""), ValueError, ["timeline", "empty"]),
    # environment settings
    ("HVDAGENTS_WINDOWS", lambda: window_mode({"HVDAGENTS_WINDOWS": "rdma"}), ValueError,
     ["HVDAGENTS_WINDOWS", "auto, mpi, relay", "'rdma'"]),
    ("HVDAGENTS_WINDOWS number", lambda: window_mode({"HVDAGENTS_WINDOWS": "1"}), ValueError,
     ["HVDAGENTS_WINDOWS", "'1'"]),
    ("HVDAGENTS_GPU (tools/setup.sh)", lambda: setup_plan.variant({"HVDAGENTS_GPU": "yes"}, False), ValueError,
     ["HVDAGENTS_GPU", "0 or 1", "'yes'"]),
    # hvdagents launch: LaunchSpec and --hosts
    ("LaunchSpec.np 0", lambda: LaunchSpec(np=0, script="t.py"), ValueError, ["LaunchSpec.np", "0"]),
    ("LaunchSpec.np bool", lambda: LaunchSpec(np=True, script="t.py"), ValueError, ["LaunchSpec.np", "True"]),
    ("LaunchSpec.np text", lambda: LaunchSpec(np="2", script="t.py"), ValueError, ["LaunchSpec.np", "'2'"]),
    ("LaunchSpec.script empty", lambda: LaunchSpec(np=2, script=""), ValueError, ["LaunchSpec.script", "''"]),
    ("LaunchSpec.script number", lambda: LaunchSpec(np=2, script=5), ValueError, ["LaunchSpec.script", "5"]),
    ("LaunchSpec.python empty", lambda: LaunchSpec(np=2, script="t.py", python=""), ValueError,
     ["LaunchSpec.python", "''"]),
    ("LaunchSpec.args string", lambda: LaunchSpec(np=2, script="t.py", args="--epochs 3"), ValueError,
     ["LaunchSpec.args", "'--epochs 3'"]),
    ("LaunchSpec.hosts string", lambda: LaunchSpec(np=2, script="t.py", hosts="h:2"), ValueError,
     ["LaunchSpec.hosts", "'h:2'"]),
    ("LaunchSpec.hosts 0 slots", lambda: LaunchSpec(np=2, script="t.py", hosts=(("h", 0),)), ValueError,
     ["LaunchSpec.hosts", "('h', 0)"]),
    ("LaunchSpec.launcher", lambda: LaunchSpec(np=2, script="t.py", launcher="ssh"), ValueError,
     ["LaunchSpec.launcher", "'ssh'"]),
    ("LaunchSpec.oversubscribe", lambda: LaunchSpec(np=2, script="t.py", oversubscribe="no"), ValueError,
     ["LaunchSpec.oversubscribe", "'no'"]),
    ("too few slots", lambda: build_command(LaunchSpec(np=4, script="t.py", hosts=(("h", 2),)), {}), ValueError,
     ["--hosts", "2 slots", "4 ranks", "--oversubscribe"]),
    ("srun with hosts", lambda: build_command(LaunchSpec(np=2, script="t.py", hosts=(("h", 2),), launcher="srun"), {}),
     ValueError, ["srun", "--hosts"]),
    ("--hosts slots text", lambda: parse_hosts("a:x"), ValueError, ["--hosts", "'a:x'"]),
    ("--hosts 0 slots", lambda: parse_hosts("a:0"), ValueError, ["--hosts", "'a:0'"]),
    ("--hosts no name", lambda: parse_hosts(":2"), ValueError, ["--hosts", "':2'"]),
    ("--hosts empty", lambda: parse_hosts(","), ValueError, ["--hosts", "','"]),
]


@pytest.mark.parametrize("what,call,kind,words", CASES, ids=[c[0] for c in CASES])
def test_bad_value_names_the_field(what, call, kind, words):
    with pytest.raises(kind) as caught:
        call()
    missing = [w for w in words if w not in str(caught.value)]
    assert not missing, f"{what}: message {str(caught.value)!r} lacks {missing}"


#: ``hvdagents launch`` command lines: argparse's exit 2 with a message naming the argument.
LAUNCH_ARGS = [
    (["-np", "0", "t.py"], ["-np", "'0'"]),
    (["-np", "two", "t.py"], ["-np", "'two'"]),
    (["-np", "2", "--launcher", "ssh", "t.py"], ["--launcher", "'ssh'"]),
    (["-np", "2", "--hosts", "a:0", "t.py"], ["--hosts", "'a:0'"]),
    (["-np", "4", "--hosts", "a:1,b:1", "t.py"], ["--hosts", "2 slots", "4 ranks"]),
    (["-np", "2", "--launcher", "srun", "--hosts", "a:2", "t.py"], ["srun", "--hosts"]),
    (["-np", "2"], ["script"]),
    (["t.py"], ["-np"]),
]


@pytest.mark.parametrize("argv,words", LAUNCH_ARGS, ids=[" ".join(a) for a, _ in LAUNCH_ARGS])
def test_launch_arguments_refused_naming_the_argument(argv, words, capsys):
    with pytest.raises(SystemExit) as caught:
        launch.main(["--dry-run", *argv])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    missing = [w for w in words if w not in err]
    assert not missing, f"{argv}: {err!r} lacks {missing}"


# -- the agents' own arguments, in a world of one (no Horovod, no window: refused first) -----------
def _torch():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    return torch, model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("bad,kind,words", [
    ("strategy", TypeError, ["strategy must be one of", "got str"]),
    ("strategy class", TypeError, ["strategy must be one of", "got type"]),
    ("model", TypeError, ["model must be a torch.nn.Module", "NoneType"]),
    ("optimizer", TypeError, ["optimizer must be a torch.optim.Optimizer", "str"]),
])
def test_torch_agent_arguments(bad, kind, words):
    torch, model, opt = _torch()
    args = {"model": model, "optimizer": opt, "strategy": hva.Sync()}
    args.update({"strategy": {"strategy": "sync", "strategy class": hva.Sync}.get(bad, args["strategy"])})
    if bad == "model":
        args["model"] = None
    if bad == "optimizer":
        args["optimizer"] = "sgd"
    with pytest.raises(kind) as caught:
        hva.TorchAgent(**args)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_window_arguments():
    from mpi4py import MPI

    from hvdagents.strategies.windows import ParameterWindow

    for args, kind, words in [((0,), ValueError, ["n must be >= 1", "0"]),
                              ((4.0,), TypeError, ["n must be an int", "4.0"]),
                              ((4, "int8"), ValueError, ["dtype must be float32 or float64", "'int8'"])]:
        with pytest.raises(kind) as caught:
            ParameterWindow(*args, comm=MPI.COMM_SELF)
        assert all(w in str(caught.value) for w in words), str(caught.value)
    with pytest.raises(TypeError, match="comm must be an mpi4py intracommunicator; got 5"):
        ParameterWindow(4, comm=5)


# -- values that differ between ranks: the error every rank raises after the one gather -----------
def test_agreement_raises_the_first_ranks_problem_on_every_rank():
    gathered = [(None, "a"), ((TypeError, "model must be a torch.nn.Module; got NoneType"), None),
                ((UsageError, "later problem"), None)]
    here = agreement_error(gathered, 1, differ="unused")
    there = agreement_error(gathered, 0, differ="unused")
    assert type(here) is TypeError and str(here) == "model must be a torch.nn.Module; got NoneType"
    assert type(there) is TypeError and str(there).endswith("(on rank 1)")
    assert agreement_error([(None, "a"), (None, "a")], 0, differ="X must agree") is None
    differ = agreement_error([(None, "auto"), (None, "relay")], 0, differ="HVDAGENTS_WINDOWS must be the same")
    assert isinstance(differ, ValueError)
    assert str(differ) == "HVDAGENTS_WINDOWS must be the same; got rank 0: auto, rank 1: relay"
    assert agreement_error([(None, 1), (None, 2)], 0) is None  # no differ: values are not compared


@pytest.mark.parametrize("made,words", [
    ([("TorchAgent", hva.LocalSGD(period=2))] * 2 + [("TorchAgent", hva.LocalSGD(period=3))],
     ["LocalSGD.period is 2 on rank 0 but 3 on rank 2"]),
    ([("TorchAgent", hva.EASGD(alpha=0.1)), ("TorchAgent", hva.EASGD(alpha=0.2, period=2))],
     ["EASGD.alpha is 0.1 on rank 0 but 0.2 on rank 1", "EASGD.period is 4 on rank 0 but 2 on rank 1"]),
    ([("TorchAgent", hva.Sync()), ("TorchAgent", hva.Downpour())],
     ["rank 0 makes TorchAgent(strategy=Sync(", "rank 1 makes TorchAgent(strategy=Downpour("]),
    ([("TorchAgent", hva.Sync()), ("KerasAgent", hva.Sync())], ["rank 1 makes KerasAgent"]),
    ([("TorchAgent", hva.Gossip(weights=[[0.5, 0.5], [0.5, 0.5]])), ("TorchAgent", hva.Gossip())],
     ["Gossip.weights is ((0.5, 0.5), (0.5, 0.5)) on rank 0 but None on rank 1"]),
])
def test_agent_difference_names_the_fields(made, words):
    error = agreement_error([(None, m) for m in made], 0, differ=_agent_difference)
    assert isinstance(error, ValueError)
    assert all(w in str(error) for w in words), str(error)


def test_same_strategy_values_agree():
    made = [("TorchAgent", hva.Gossip(weights=[[0.5, 0.5], [0.5, 0.5]], seed=3))] * 2
    assert agreement_error([(None, m) for m in made], 1, differ=_agent_difference) is None
    assert np.isfinite(hva.EASGD(alpha=np.float32(0.5)).alpha)  # NumPy scalars are numbers too


@pytest.mark.parametrize("kwargs,kind,words", [
    ({"optimizer": "sgd"}, TypeError, ["wraps a Keras 3 optimizer", "str"]),
    ({"compression": "zip"}, ValueError, ["compression", "'zip'"]),
    ({"backward_passes_per_step": 0}, ValueError, ["backward_passes_per_step", ">= 1", "0"]),
    ({"op": "max"}, ValueError, ["op", "Average and Sum"]),
])
def test_keras_dropin_distributed_optimizer_arguments(kwargs, kind, words):
    keras = pytest.importorskip("keras")
    from hvdagents.keras import DistributedOptimizer

    args = {"optimizer": keras.optimizers.SGD(0.1), **kwargs}
    with pytest.raises(kind) as caught:
        DistributedOptimizer(**args)
    assert all(w in str(caught.value) for w in words), str(caught.value)
