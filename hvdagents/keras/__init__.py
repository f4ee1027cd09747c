"""``hvdagents.keras``: Horovod's Keras API for Keras 3 (TensorFlow backend).

A drop-in for ``horovod.tensorflow.keras``, which does not work under Keras 3 (Horovod
issue #4290): change ``import horovod.tensorflow.keras as hvd`` to
``import hvdagents.keras as hvd``. The names, their arguments and their meaning are
Horovod's (the README's "Horovod's Keras API" table lists what differs); each is a thin
forward to hvdagents' one implementation (:func:`hvdagents.init`, ``horovod.tensorflow``'s
collectives, :class:`DistributedOptimizer`, :mod:`.callbacks`). Importing it starts
nothing: MPI and Horovod start in :func:`init` (or with the first averaged gradients).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from . import callbacks
from .dropin import (
    Compression,
    allgather,
    allreduce,
    broadcast,
    broadcast_variables,
    compression_name,
    cross_rank,
    cross_size,
    init,
    is_initialized,
    local_rank,
    local_size,
    rank,
    shutdown,
    size,
)
from .optimizer import DistributedOptimizer

__all__ = [
    "Average", "Sum", "Compression", "DistributedOptimizer", "allgather", "allreduce", "broadcast",
    "broadcast_variables", "callbacks", "cross_rank", "cross_size", "init", "is_initialized", "load_model",
    "local_rank", "local_size", "rank", "shutdown", "size",
]


def load_model(filepath: Any, custom_optimizers: Iterable[type] | None = None,
               custom_objects: Mapping[str, Any] | None = None, compression: Any = Compression.none) -> Any:
    """Horovod's ``load_model``: ``keras.models.load_model(filepath)`` with the saved
    optimizer (its state included) wrapped in :class:`DistributedOptimizer` with
    ``compression`` (the argument wins over a compression the file names, as in Horovod,
    whose files name none), ready to train on. ``custom_optimizers``: optimizer classes the
    file names (by class name); ``custom_objects`` as Keras takes them. Local: loading does not
    communicate (start every rank from rank 0's file, or broadcast after)."""
    import keras

    from .optimizer import distributed_outermost

    objects = {cls.__name__: cls for cls in custom_optimizers or ()}
    objects.update(custom_objects or {})
    model = keras.models.load_model(filepath, custom_objects=objects)
    if getattr(model, "optimizer", None) is not None:
        model.optimizer = distributed_outermost(model.optimizer, compression_name(compression))
        model.optimizer.compression = compression_name(compression)  # the argument, as in Horovod
    return model


def __getattr__(name: str) -> Any:
    """``Average`` and ``Sum``, Horovod's reduction constants (see :mod:`.dropin`)."""
    from . import dropin

    return getattr(dropin, name)
