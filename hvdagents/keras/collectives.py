"""Keras collectives on variables and scalars, through Horovod's TensorFlow binding: the one
implementation behind the agent, the callbacks and the drop-in (:mod:`hvdagents.keras`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import tensorflow as tf

from ..runtime import horovod_binding

__all__ = ["broadcast_variables", "average_values"]

#: Rank whose values a broadcast spreads unless told otherwise.
ROOT_RANK = 0


def broadcast_variables(variables: Sequence[Any], root_rank: int = ROOT_RANK) -> None:
    """Collective: assign ``root_rank``'s value of every variable on every rank.

    Variables are broadcast one by one in list order, which must be the same on every rank
    (Keras' ``model.weights`` and ``optimizer.variables`` orders are)."""
    hvd = horovod_binding("tensorflow")
    if hvd.size() == 1:
        return
    for i, v in enumerate(variables):
        v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=root_rank, name=f"hvdagents.bcast.{i}"))


def average_values(values: Mapping[str, float]) -> dict[str, float]:
    """Collective: the mean over ranks of each named scalar (one all-reduce, keys sorted).

    Every rank must pass the same keys."""
    hvd = horovod_binding("tensorflow")
    keys = sorted(values)
    if hvd.size() == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    local = tf.constant([float(values[k]) for k in keys], dtype=tf.float64)
    mean = hvd.allreduce(local, op=hvd.Average, name="hvdagents.metrics").numpy()
    return dict(zip(keys, map(float, mean)))
