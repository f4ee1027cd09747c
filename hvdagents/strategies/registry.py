"""The one place that maps a strategy's settings to the runner that carries it out."""

from __future__ import annotations

from typing import Callable

from .async_diloco import AsyncDiLoCoExchange
from .async_runner import AsyncRunner
from .base import LocalSGDRunner, Runner, SyncRunner
from .config import EASGD, AsyncDiLoCo, DiLoCo, Downpour, Gossip, LocalSGD, Strategy, Sync, ZeRO
from .diloco import DiLoCoRunner
from .exchanges import DownpourExchange, EASGDExchange, GossipExchange
from .sharded import ShardedRunner
from .staleness import StalenessBound

__all__ = ["make_runner", "strategy_names", "RUNNERS"]

#: Strategy settings class -> runner factory.
RUNNERS: dict[type, Callable[[Strategy], Runner]] = {
    Sync: SyncRunner,
    LocalSGD: LocalSGDRunner,
    Downpour: lambda s: AsyncRunner(s, DownpourExchange),
    EASGD: lambda s: AsyncRunner(s, EASGDExchange),
    Gossip: lambda s: AsyncRunner(s, GossipExchange),
    ZeRO: ShardedRunner,
    DiLoCo: DiLoCoRunner,
    AsyncDiLoCo: lambda s: AsyncRunner(s, AsyncDiLoCoExchange),
}


def strategy_names() -> str:
    """``hva.Sync(), hva.LocalSGD(), ...``: every strategy an agent takes, for error messages."""
    return ", ".join(f"hva.{cls.__name__}()" for cls in RUNNERS)


def make_runner(strategy: Strategy) -> Runner:
    """The runner for ``strategy``, wrapped in a :class:`StalenessBound` when the settings
    have ``max_staleness``. Local: no communication until the agent calls ``start``."""
    factory = next((f for cls, f in RUNNERS.items() if isinstance(strategy, cls)), None)
    if factory is None:
        raise TypeError(
            f"strategy must be an hvdagents strategy ({strategy_names()}); got {type(strategy).__name__}"
        )
    runner = factory(strategy)
    bound = getattr(strategy, "max_staleness", None)
    return runner if bound is None else StalenessBound(runner, bound)
