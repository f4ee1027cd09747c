"""AsyncDiLoCo in one process: its settings and the runner it gets (no MPI world needed)."""

import pytest

import hvdagents as hva
from hvdagents.strategies.async_diloco import AsyncDiLoCoExchange
from hvdagents.strategies.async_runner import AsyncRunner
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.staleness import StalenessBound

BAD = [
    (lambda: hva.AsyncDiLoCo(inner_steps=0), ValueError, ["AsyncDiLoCo.inner_steps", "0"]),
    (lambda: hva.AsyncDiLoCo(inner_steps=2.0), TypeError, ["AsyncDiLoCo.inner_steps", "2.0"]),
    (lambda: hva.AsyncDiLoCo(outer_lr=0.0), ValueError, ["AsyncDiLoCo.outer_lr", "(0, 10]", "0.0"]),
    (lambda: hva.AsyncDiLoCo(outer_lr=float("inf")), ValueError, ["AsyncDiLoCo.outer_lr", "inf"]),
    (lambda: hva.AsyncDiLoCo(outer_momentum=1.0), ValueError, ["AsyncDiLoCo.outer_momentum", "[0, 1)", "1.0"]),
    (lambda: hva.AsyncDiLoCo(outer_momentum=True), TypeError, ["AsyncDiLoCo.outer_momentum", "bool"]),
    (lambda: hva.AsyncDiLoCo(nesterov="yes"), TypeError, ["AsyncDiLoCo.nesterov", "'yes'"]),
    (lambda: hva.AsyncDiLoCo(max_staleness=-1), ValueError, ["AsyncDiLoCo.max_staleness", "-1"]),
]


@pytest.mark.parametrize("make,error,words", BAD)
def test_bad_settings_name_the_field_and_value(make, error, words):
    with pytest.raises(error) as raised:
        make()
    for word in words:
        assert word in str(raised.value)


def test_defaults_are_the_papers_and_h_is_the_exchange_period():
    s = hva.AsyncDiLoCo()
    assert (s.inner_steps, s.outer_lr, s.outer_momentum, s.nesterov) == (500, 0.7, 0.9, True)
    assert hva.AsyncDiLoCo(inner_steps=7).period == 7
    assert s.synchronous is False


def test_it_runs_on_the_asynchronous_runner_with_its_own_exchange():
    runner = make_runner(hva.AsyncDiLoCo(inner_steps=4))
    assert isinstance(runner, AsyncRunner) and runner._exchange_type is AsyncDiLoCoExchange
    bounded = make_runner(hva.AsyncDiLoCo(max_staleness=2))
    assert isinstance(bounded, StalenessBound)
    assert bounded.snapshot_shape(5) == (5,)  # before start: no exchange, no rows yet
