"""Data sharding: which contiguous slice of a data set belongs to which rank."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar, overload

__all__ = ["shard", "shard_bounds", "repeat_to", "num_items"]

T = TypeVar("T")


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of rank ``rank``'s contiguous slice of ``n`` items.

    Every rank gets ``n // size`` items and the first ``n % size`` ranks one more, so
    the slices tile ``range(n)`` exactly once, in rank order, on every rank alike.
    Pure arithmetic: no communication.
    """
    for name, value in (("the number of items", n), ("rank", rank), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
            raise TypeError(f"shard: {name} must be an int; got {type(value).__name__} {value!r}")
    n, rank, size = int(n), int(rank), int(size)
    if n < 0:
        raise ValueError(f"shard: the number of items must be >= 0; got {n}")
    if size < 1:
        raise ValueError(f"shard: size must be >= 1; got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"shard: rank must be in [0, {size}); got {rank}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@overload
def shard(data: int, *, rank: int | None = ..., size: int | None = ...) -> range: ...
@overload
def shard(data: Sequence[T], *, rank: int | None = ..., size: int | None = ...) -> Sequence[T]: ...


def shard(data: Any, *, rank: int | None = None, size: int | None = None) -> Any:
    """This rank's contiguous slice of ``data``.

    ``data`` is an item count (returns a ``range`` of indices), a NumPy array (a view
    along the first axis) or any sliceable sequence. ``rank``/``size`` default to the
    running job's (``hva.init()`` is called if needed). Local: no communication; the
    same rule on every rank (see :func:`shard_bounds`), so ``shard(x)`` and ``shard(y)``
    stay aligned.
    """
    if rank is None or size is None:
        from .runtime import init

        ctx = init()
        rank = ctx.rank if rank is None else rank
        size = ctx.size if size is None else size
    if isinstance(data, bool):
        raise TypeError("shard: expected an item count, an array or a sequence; got a bool")
    if isinstance(data, int):
        start, stop = shard_bounds(data, rank, size)
        return range(start, stop)
    try:
        n = len(data)
    except TypeError:
        raise TypeError(
            f"shard: expected an item count, an array or a sequence; got {type(data).__name__}"
        ) from None
    start, stop = shard_bounds(n, rank, size)
    return data[start:stop]


def num_items(data: Any) -> int | None:
    """The number of items (first-axis length) of an array, or of a list, tuple or dict of
    equally long arrays; ``None`` for anything else (a dataset, a generator) or ``None``."""
    if data is None:
        return None
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (list, tuple)):
        lengths = {num_items(d) for d in data}
        return lengths.pop() if len(lengths) == 1 else None
    shape = getattr(data, "shape", None)
    return int(shape[0]) if shape else None


def repeat_to(data: Any, n: int) -> Any:
    """``data`` (as :func:`num_items` reads it) lengthened to ``n`` items by repeating its
    items from the first, as PyTorch's ``DistributedSampler`` pads uneven shards. Local."""
    import numpy as np

    if data is None:
        return None
    if isinstance(data, dict):
        return {k: repeat_to(v, n) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(repeat_to(v, n) for v in data)
    have = num_items(data)
    if not have:
        raise ValueError(f"cannot lengthen an empty shard to {n} items: every rank needs data")
    return np.take(np.asarray(data), np.arange(n) % have, axis=0)
