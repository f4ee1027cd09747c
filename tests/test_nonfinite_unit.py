"""Non-finite values in one process: each asynchronous exchange refuses a NaN or an infinity
before it writes to its window (world of one, ``COMM_SELF``), naming the parameter; the
``Sync.nonfinite`` setting is checked. Multi-rank: ``tests/test_nonfinite_mpi.py``."""

import numpy as np
import pytest
from mpi4py import MPI

from hvdagents.errors import NonFiniteError
from hvdagents.strategies.config import EASGD, Downpour, Gossip, Sync
from hvdagents.strategies.exchanges import DownpourExchange, EASGDExchange, GossipExchange

SIZES = [("a", 4), ("b.weight", 2), ("c", 1)]


class Flat:
    """A model of 7 float64 parameters in three named pieces (a ParameterAccess)."""

    dtype = np.dtype(np.float64)
    num_parameters = 7

    def __init__(self) -> None:
        self.x = np.arange(1.0, 8.0)

    def get_flat(self) -> np.ndarray:
        return self.x.copy()

    def set_flat(self, values: np.ndarray) -> None:
        self.x = np.array(values, dtype=np.float64)

    def parameter_sizes(self) -> list[tuple[str, int]]:
        return SIZES


def shared(exchange) -> np.ndarray:
    if isinstance(exchange, GossipExchange):
        return exchange.models.read(0, out=np.empty(exchange.n))
    return exchange.store.pull()


@pytest.mark.parametrize("make", [
    lambda: DownpourExchange(Downpour(period=1), 7, np.float64, MPI.COMM_SELF),
    lambda: EASGDExchange(EASGD(period=1), 7, np.float64, MPI.COMM_SELF),
    lambda: GossipExchange(Gossip(period=1), 7, np.float64, MPI.COMM_SELF),
], ids=["downpour", "easgd", "gossip"])
@pytest.mark.parametrize("index,bad,name", [(0, np.nan, "a"), (3, np.inf, "a"), (4, -np.inf, "b.weight"),
                                            (5, np.nan, "b.weight"), (6, np.nan, "c")])
def test_a_nonfinite_exchange_is_refused_before_it_writes(make, index, bad, name):
    exchange = make()
    try:
        params = Flat()
        exchange.seed(params)
        params.x[1] += 0.5  # some finite progress: a write would change the window
        before = shared(exchange)
        params.x[index] = bad
        with pytest.raises(NonFiniteError, match=rf"holds a non-finite value \({bad!r}\) in parameter '{name}'") as err:
            exchange.exchange(params)
        assert err.value.parameter == name
        np.testing.assert_array_equal(shared(exchange), before)  # nothing was written
        params.x[index] = 2.0
        exchange.exchange(params)  # a finite exchange goes through and writes
        assert not np.array_equal(shared(exchange), before)
    finally:
        exchange.close()


def test_sync_nonfinite_setting_is_checked():
    assert Sync().nonfinite == "pass"
    assert Sync(nonfinite="raise").nonfinite == "raise"
    with pytest.raises(ValueError, match="Sync.nonfinite must be 'pass' or 'raise'; got 'skip'"):
        Sync(nonfinite="skip")
