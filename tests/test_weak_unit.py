"""Asynchronous strategies in one process, without MPI: settings checks and runner selection.

Each bad setting raises ValueError (TypeError for a wrong type) naming the field."""

import pytest

from hvdagents.errors import UsageError
from hvdagents.strategies.async_runner import AsyncRunner
from hvdagents.strategies.config import EASGD, Downpour, Gossip, LocalSGD, Sync
from hvdagents.strategies.exchanges import DownpourExchange, EASGDExchange, GossipExchange
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.staleness import StalenessBound
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
    (lambda: Gossip(weights=[[0.5, 0.4], [0.5, 0.5]]), "doubly stochastic.*row 0 sums to 0.9"),
    (lambda: Gossip(weights=[[0.5, 0.5], [0.0, 1.0]]), "doubly stochastic.*column 0 sums to 0.5"),
    (lambda: Gossip(weights=[[1.0]]).matrix(2), "Gossip.weights must be 2x2 for 2 ranks; got 1x1"),
])
def test_bad_values_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: Downpour(period=2.0), "Downpour.period must be an int"),
    (lambda: Downpour(normalize="yes"), "Downpour.normalize must be a bool"),
    (lambda: Downpour(staleness_aware=1), "Downpour.staleness_aware must be a bool"),
    (lambda: EASGD(alpha="0.1"), "EASGD.alpha must be a float"),
    (lambda: Gossip(period=True), "Gossip.period must be an int"),
])
def test_bad_types_name_the_field(make, message):
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("strategy, exchange", [
    (Downpour(), DownpourExchange), (EASGD(), EASGDExchange), (Gossip(), GossipExchange),
])
def test_each_weak_strategy_gets_an_async_runner_with_its_exchange(strategy, exchange):
    runner = make_runner(strategy)
    assert type(runner) is AsyncRunner and runner._exchange_type is exchange


def test_make_runner_refuses_what_is_not_a_strategy():
    with pytest.raises(TypeError, match=r"strategy must be an hvdagents strategy .*; got str") as raised:
        make_runner("sync")
    for name in ("Sync", "LocalSGD", "Downpour", "EASGD", "Gossip", "ZeRO", "DiLoCo"):  # every one it takes
        assert f"hva.{name}()" in str(raised.value)


def test_the_staleness_bound_wraps_the_runner_when_set():
    for strategy in (Downpour(max_staleness=3), EASGD(max_staleness=0), Gossip(max_staleness=1)):
        runner = make_runner(strategy)
        assert type(runner) is StalenessBound and runner.max_staleness == strategy.max_staleness
        assert type(runner.inner) is AsyncRunner
    assert type(make_runner(Gossip())) is AsyncRunner
    assert not isinstance(make_runner(Sync()), StalenessBound)
    assert not isinstance(make_runner(LocalSGD()), StalenessBound)


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


def test_an_easgd_centre_that_would_oscillate_is_refused_with_the_rule():
    from hvdagents.strategies.exchanges import EASGDExchange

    EASGDExchange.check_world(EASGD(alpha=0.45), 4)  # β = 1.8: damped
    with pytest.raises(ValueError, match=r"EASGD.alpha × agents must be < 2.*0.5 × 4 = 2.*0.9 / 4 = 0.225"):
        EASGDExchange.check_world(EASGD(alpha=0.5), 4)
