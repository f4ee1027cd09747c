"""ZeRO's runner and partition, framework-neutral (the adapters do the tensor work).

The partition (:func:`shard_ranges`) is the one rule every framework follows: a flat vector
of ``length`` elements is cut into ``size`` contiguous ranges in rank order, the first
``length % size`` ranks one element longer, which is also how Horovod's ``reducescatter``
splits the first dimension, so a reduce-scatter hands each rank exactly its range.
:func:`rounds` cuts the ranges further into rounds of at most about ``round_elements``
elements over all ranks (each round splits as Horovod does too), so no collective holds
more than one round of the whole vector at a time.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from ..errors import UsageError
from .base import ParameterAccess, Runner
from .config import Strategy, ZeRO

__all__ = ["shard_ranges", "rounds", "checkpoint_strategy", "ShardedRunner", "ShardedOptimizerState"]


def shard_ranges(length: int, size: int) -> list[tuple[int, int]]:
    """Rank r's contiguous range ``[lo, hi)`` of ``length`` elements, for every rank: sizes
    ``length // size``, plus one for the first ``length % size`` ranks. Pure."""
    base, extra = divmod(int(length), int(size))
    ranges, lo = [], 0
    for r in range(size):
        hi = lo + base + (1 if r < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def rounds(length: int, size: int, round_elements: int) -> list[list[tuple[int, int]]]:
    """The rounds of a collective over :func:`shard_ranges`: ``result[j][r]`` is the part
    ``[lo, hi)`` (in the flat vector) that rank r sends or receives in round j. Every round
    but the last takes the same number of elements from each rank; the last takes the rest,
    whose sizes again differ by at most one with the longer ones first, so Horovod's
    split of each round's concatenation is exactly these parts. Pure."""
    ranges = shard_ranges(length, size)
    base = int(length) // int(size)
    chunk = max(1, int(round_elements) // int(size))
    count = max(1, -(-base // chunk))
    out = []
    for j in range(count):
        last = j == count - 1
        out.append([(lo + j * chunk, hi if last else lo + (j + 1) * chunk) for lo, hi in ranges])
    return out


def checkpoint_strategy(strategy: Strategy) -> str:
    """The strategy a checkpoint names in its header: ``"Sync"`` for :class:`~.config.ZeRO`,
    whose checkpoints hold the whole optimizer state as ``Sync``'s do (so either loads the
    other's, at any world size); else the settings' class name."""
    return "Sync" if isinstance(strategy, ZeRO) else type(strategy).__name__


class ShardedOptimizerState(Protocol):
    """What an adapter returns from ``shard_optimizer``: the rank's part of the optimizer."""

    def close(self) -> None:
        """Remove every hook; the sharded state is dropped. Local."""


class ShardedRunner(Runner):
    """:class:`~.config.ZeRO`: the adapter's ``shard_optimizer(strategy)`` (made at
    :meth:`start`, closed at :meth:`finish`) reduces the gradients, steps this rank's range
    and all-gathers the parameters inside every optimizer step, so the parameters never
    diverge and there is nothing to do after a step but count it."""

    strategy: ZeRO
    acts_after_step = False

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._sharded: Optional[ShardedOptimizerState] = None

    def start(self, params: ParameterAccess) -> None:
        shard: Any = getattr(params, "shard_optimizer", None)
        if shard is None:
            raise UsageError(
                f"hva.ZeRO is not available for {type(params).__name__} yet (TorchAgent and KerasAgent have it); "
                "use hva.Sync() meanwhile"
            )
        self._sharded = shard(self.strategy)

    def after_step(self, params: ParameterAccess) -> None:
        self.state.step += 1
        self.state.last_sync_step = self.state.step

    def finish(self, params: ParameterAccess) -> None:
        if self._sharded is not None:
            self._sharded.close()
            self._sharded = None
