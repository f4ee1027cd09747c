"""Asynchronous strategies in one process, without MPI: settings checks and runner selection.

Each bad setting raises ValueError (TypeError for a wrong type) naming the field."""

import pytest

from hvdagents.errors import UsageError
from hvdagents.strategies.base import make_runner
from hvdagents.strategies.config import EASGD, Downpour, Gossip, Sync
from hvdagents.strategies.weak import DownpourRunner, EASGDRunner, GossipRunner, make_weak_runner
from mpirun import run_job


@pytest.mark.parametrize("make, message", [
    (lambda: Downpour(period=0), "Downpour.period must be >= 1; got 0"),
    (lambda: Downpour(max_staleness=-1), "Downpour.max_staleness must be >= 0; got -1"),
    (lambda: EASGD(alpha=0.0), r"EASGD.alpha must be in \(0, 1\); got 0.0"),
    (lambda: EASGD(alpha=1.5), r"EASGD.alpha must be in \(0, 1\); got 1.5"),
    (lambda: EASGD(period=0), "EASGD.period must be >= 1; got 0"),
    (lambda: EASGD(max_staleness=-2), "EASGD.max_staleness must be >= 0; got -2"),
    (lambda: Gossip(period=0), "Gossip.period must be >= 1; got 0"),
    (lambda: Gossip(weights=[[0.5, 0.5]]), r"Gossip.weights must be a square matrix; got shape \(1, 2\)"),
    (lambda: Gossip(weights=[[1.5, -0.5], [0.5, 0.5]]), "Gossip.weights must be finite and non-negative"),
    (lambda: Gossip(weights=[[0.5, 0.4], [0.5, 0.5]]), "row-stochastic.*row 0 sums to 0.9"),
    (lambda: Gossip(weights=[[1.0]]).matrix(2), "Gossip.weights must be 2x2 for 2 ranks; got 1x1"),
])
def test_bad_values_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: Downpour(period=2.0), "Downpour.period must be an int"),
    (lambda: Downpour(normalize="yes"), "Downpour.normalize must be a bool"),
    (lambda: EASGD(alpha="0.1"), "EASGD.alpha must be a float"),
    (lambda: Gossip(period=True), "Gossip.period must be an int"),
])
def test_bad_types_name_the_field(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("strategy, runner", [
    (Downpour(), DownpourRunner), (EASGD(), EASGDRunner), (Gossip(), GossipRunner),
])
def test_each_weak_strategy_gets_its_runner(strategy, runner):
    assert type(make_runner(strategy)) is runner
    assert type(make_weak_runner(strategy)) is runner


def test_make_weak_runner_refuses_other_strategies():
    with pytest.raises(TypeError, match="make_weak_runner takes .*; got Sync"):
        make_weak_runner(Sync())


def test_staleness_bound_is_read_from_the_settings():
    assert make_runner(Downpour(max_staleness=3)).max_staleness == 3
    assert make_runner(EASGD(max_staleness=0)).max_staleness == 0
    assert make_runner(Gossip()).max_staleness is None


@pytest.mark.parametrize("method", ["after_step", "finish"])
def test_steps_before_start_are_refused(method):
    runner = make_runner(Downpour())
    with pytest.raises(UsageError, match=rf"{method}\(\) was called before start\(\)"):
        getattr(runner, method)(None)


def test_gloo_launch_is_refused_with_the_fix():
    """Under 'horovodrun --gloo' MPI sees a world of one: nothing asynchronous may start."""
    gloo = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_SIZE": "2", "HOROVOD_RANK": "1",
            "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}
    (out,) = run_job("weak_gloo.py", launcher=(), env=gloo, timeout=60).check().results()
    assert (out["mpi_world"], out["size"]) == (False, 2)
    for name in ("downpour", "easgd", "gossip"):
        assert "horovodrun --gloo" in out[name] and "mpirun, srun --mpi=pmix" in out[name], out
    assert "horovodrun without --gloo" in out["window"], out
