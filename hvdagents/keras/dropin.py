"""The functions of ``horovod.tensorflow.keras``, argument by argument, under Keras 3.

Thin forwards: process identity comes from :func:`hvdagents.init` (its context), the
collectives are ``horovod.tensorflow``'s own (which work under Keras 3; it is
``horovod.tensorflow.keras`` that does not), started with hvdagents' settings by
:func:`hvdagents.runtime.horovod_binding`. Importing this module starts nothing: MPI and
Horovod start in :func:`init`.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..errors import UsageError

__all__ = [
    "Compression", "init", "shutdown", "is_initialized", "size", "rank", "local_rank", "local_size",
    "cross_rank", "cross_size", "allreduce", "allgather", "broadcast", "broadcast_variables",
]

_NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."


class Compression:
    """Horovod's gradient compression choices: ``Compression.none`` (as is) and
    ``Compression.fp16`` (floating tensors cast to float16 on the wire). Horovod's own
    compressor classes are accepted wherever these are."""

    none = None
    fp16 = "fp16"


def compression_name(compression: Any) -> str | None:
    """``None`` or ``"fp16"`` for any way of saying it (ours, Horovod's classes, a string)."""
    if compression in (None, "none", "fp16"):
        return None if compression in (None, "none") else "fp16"
    name = getattr(compression, "__name__", type(compression).__name__)
    if name == "NoneCompressor":
        return None
    if name == "FP16Compressor":
        return "fp16"
    raise ValueError(f"compression must be Compression.none or Compression.fp16; got {compression!r}")


def _binding() -> Any:
    """``horovod.tensorflow``, once :func:`init` started it; else Horovod's own error."""
    from ..runtime import _bindings

    hvd = _bindings.get("tensorflow")
    if hvd is None:
        raise ValueError(_NOT_INITIALIZED)
    return hvd


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Horovod's ``init``: :func:`hvdagents.init` (MPI through mpi4py, identity, GPU pinning),
    then Horovod's TensorFlow binding on ``COMM_WORLD``. Collective; idempotent. ``comm``
    may be ``None``, ``MPI.COMM_WORLD`` or the list of all ranks; sub-communicators and
    process sets are not supported (``UsageError``)."""
    from ..runtime import horovod_binding
    from ..runtime import init as init_runtime

    if process_sets is not None:
        raise UsageError("hvdagents.keras.init: process_sets are not supported; every rank takes part")
    ctx = init_runtime()
    if comm is not None:
        from mpi4py import MPI

        whole = comm is MPI.COMM_WORLD or (isinstance(comm, Sequence) and list(comm) == list(range(ctx.size)))
        if not whole:
            raise UsageError("hvdagents.keras.init: comm must be None, MPI.COMM_WORLD or every rank")
    horovod_binding("tensorflow")


def shutdown() -> None:
    """Horovod's ``shutdown`` of the TensorFlow binding (MPI itself ends at exit). Local."""
    from ..runtime import _bindings

    hvd = _bindings.get("tensorflow")
    if hvd is not None:
        hvd.shutdown()


def is_initialized() -> bool:
    """Whether :func:`init` ran (Horovod's TensorFlow binding is up)."""
    from ..runtime import _bindings

    hvd = _bindings.get("tensorflow")
    return hvd is not None and bool(hvd.is_initialized())


def _context() -> Any:
    from ..runtime import context

    _binding()
    return context()


def size() -> int:
    """Number of ranks."""
    return _context().size


def rank() -> int:
    """This process's rank."""
    return _context().rank


def local_rank() -> int:
    """This process's rank among the ranks of its node."""
    return _context().local_rank


def local_size() -> int:
    """Number of ranks on this node."""
    return _context().local_size


def cross_rank() -> int:
    """This node's index among the nodes (Horovod's)."""
    return int(_binding().cross_rank())


def cross_size() -> int:
    """Number of nodes with a rank of this local rank (Horovod's)."""
    return int(_binding().cross_size())


def _op(hvd: Any, average: bool | None, op: Any) -> Any:
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if op is not None:
        return op
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed",
                      DeprecationWarning, stacklevel=3)
        return hvd.Average if average else hvd.Sum
    return hvd.Average


def _compressor(hvd: Any, compression: Any) -> Any:
    return hvd.Compression.fp16 if compression_name(compression) == "fp16" else hvd.Compression.none


def allreduce(value: Any, name: str | None = None, average: bool | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, op: Any = None, compression: Any = Compression.none) -> Any:
    """Collective: ``value`` reduced over the ranks (``op``: ``Average`` by default, or
    ``Sum``; ``average`` is Horovod's deprecated spelling), as a NumPy value."""
    import tensorflow as tf

    hvd = _binding()
    reduced = hvd.allreduce(tf.constant(value, name=name), op=_op(hvd, average, op), name=name,
                            prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                            compression=_compressor(hvd, compression))
    return reduced.numpy()


def allgather(value: Any, name: str | None = None) -> Any:
    """Collective: every rank's ``value`` concatenated along the first dimension (the other
    dimensions must agree), as a NumPy value."""
    import tensorflow as tf

    return _binding().allgather(tf.constant(value, name=name), name=name).numpy()


def broadcast(value: Any, root_rank: int, name: str | None = None) -> Any:
    """Collective: ``root_rank``'s ``value`` on every rank, as a NumPy value."""
    import tensorflow as tf

    return _binding().broadcast(tf.constant(value, name=name), root_rank, name=name).numpy()


def broadcast_variables(variables: Sequence[Any], root_rank: int) -> None:
    """Collective: assign ``root_rank``'s values to ``variables`` on every rank, in order
    (``horovod.tensorflow.broadcast_variables``; not in ``horovod.tensorflow.keras`` 0.28.1,
    offered here because Keras 3 scripts need it where sessions are gone)."""
    from .collectives import broadcast_variables as broadcast_in_order

    _binding()
    broadcast_in_order(list(variables), root_rank=root_rank)


def __getattr__(name: str) -> Any:
    """``Average`` and ``Sum``: Horovod's reduction constants (read when first used, so that
    importing this module loads no Horovod library)."""
    if name in ("Average", "Sum"):
        import horovod.tensorflow as hvd

        return getattr(hvd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
