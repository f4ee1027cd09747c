"""MPI collectives for state of any size: arrays in place, in pieces, and trees of arrays.

MPI counts are C ints: one message of more than 2**31 - 1 items fails, and a pickled object
is one such message (``comm.bcast`` of a 600M-parameter model). Here arrays travel as raw
bytes in pieces of :data:`PIECE_BYTES`, into memory the receiver already holds (no pickle, no
extra copy), and only the small skeleton of a tree (its structure, shapes and dtypes) is
pickled, through ``mpi4py.util.pkl5``, which lifts the limit for objects too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["PIECE_BYTES", "MEAN_PIECE", "bcast_array", "bcast_object", "allgather_object", "allgather_object_over",
           "bcast_object_over", "bcast_tree",
           "mean_over_ranks", "Problem", "agreement_error", "agree", "first_problem"]

#: Largest single MPI message, in bytes (well below 2**31).
PIECE_BYTES = 1 << 30

#: Elements summed per MPI call by :func:`mean_over_ranks` (float64 pieces of 32 MiB).
MEAN_PIECE = 1 << 22


def bcast_array(comm: Any, array: np.ndarray, root: int = 0) -> np.ndarray:
    """Collective: ``root``'s contents of ``array`` into ``array`` on every rank, in place.

    ``array`` must be C-contiguous with the same shape and dtype on every rank (any dtype:
    it travels as bytes, in pieces of at most :data:`PIECE_BYTES`). Returns ``array``."""
    if not array.flags.c_contiguous:
        raise ValueError("bcast_array needs a C-contiguous array")
    raw = array.reshape(-1).view(np.uint8)
    for start in range(0, raw.size, PIECE_BYTES):
        comm.Bcast(raw[start:start + PIECE_BYTES], root=root)
    return array


def _pkl5(comm: Any) -> Any:
    from mpi4py.util import pkl5

    return pkl5.Intracomm(comm)


def bcast_object(comm: Any, obj: Any, root: int = 0) -> Any:
    """Collective: ``root``'s picklable ``obj`` on every rank, of any size (pkl5)."""
    return _pkl5(comm).bcast(obj, root=root)


def allgather_object(comm: Any, obj: Any) -> list[Any]:
    """Collective: every rank's picklable ``obj``, in rank order, of any size (pkl5)."""
    return _pkl5(comm).allgather(obj)


@dataclass(frozen=True)
class _Leaf:
    """Where an array stood in a tree: its index among the leaves, shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: str


def allgather_object_over(comm: Any, hvd: Any, obj: Any, name: str | None = None) -> list[Any]:
    """Collective: every rank's ``obj`` in rank order, over ``comm`` (an MPI world) or, where
    there is none (``horovodrun --gloo``: ``comm`` is ``None``), Horovod's object all-gather."""
    if comm is not None:
        return allgather_object(comm, obj)
    return hvd.allgather_object(obj, name=name)


def bcast_object_over(comm: Any, hvd: Any, obj: Any, root: int = 0, name: str | None = None) -> Any:
    """Collective: ``root``'s ``obj`` on every rank, over ``comm`` or, where it is ``None``,
    Horovod's object broadcast."""
    if comm is not None:
        return bcast_object(comm, obj, root=root)
    return hvd.broadcast_object(obj, root_rank=root, name=name)


def bcast_tree(comm: Any, tree: Any, *, is_leaf: Callable[[Any], bool],
               to_array: Callable[[Any], np.ndarray], new_leaf: Callable[[tuple[int, ...], str], Any],
               leaf_dtype: Callable[[Any], str], root: int = 0) -> Any:
    """Collective: ``root``'s ``tree`` (dicts, lists and tuples of leaves and small values)
    on every rank, leaves one by one through :func:`bcast_array`.

    ``tree`` matters on ``root`` only. ``is_leaf`` tells the leaves (tensors, arrays);
    ``to_array`` gives a C-contiguous host array sharing or copying a leaf's memory;
    ``new_leaf(shape, dtype)`` allocates a receiving leaf on the other ranks, and ``leaf_dtype``
    names a leaf's dtype. Returns the tree (``root`` gets its own leaves back, unchanged)."""
    leaves: list[Any] = []

    def strip(node: Any) -> Any:
        if is_leaf(node):
            leaves.append(node)
            return _Leaf(len(leaves) - 1, tuple(node.shape), leaf_dtype(node))
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(strip(v) for v in node)
        return node

    is_root = comm.Get_rank() == root
    skeleton = bcast_object(comm, strip(tree) if is_root else None, root=root)
    if not is_root:
        def collect(node: Any) -> None:
            if isinstance(node, _Leaf):
                leaves.append(new_leaf(node.shape, node.dtype))
            elif isinstance(node, dict):
                for v in node.values():
                    collect(v)
            elif isinstance(node, (list, tuple)):
                for v in node:
                    collect(v)

        collect(skeleton)
    for leaf in leaves:
        bcast_array(comm, to_array(leaf), root=root)

    def fill(node: Any) -> Any:
        if isinstance(node, _Leaf):
            return leaves[node.index]
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(fill(v) for v in node)
        return node

    return fill(skeleton)


def mean_over_ranks(comm: Any, local: np.ndarray, out: np.ndarray, root: int = 0) -> np.ndarray:
    """Collective: ``out`` = the element-wise mean of every rank's 1-D ``local``, the same bits
    on every rank (an ``Allreduce`` does not promise that).

    Summed in float64 on ``root`` in pieces of :data:`MEAN_PIECE` elements (no float64 copy of
    the whole vector), cast to ``out``'s dtype there, then broadcast. Returns ``out``."""
    from mpi4py import MPI

    on_root = comm.Get_rank() == root
    for lo in range(0, local.size, MEAN_PIECE):
        piece = local[lo:lo + MEAN_PIECE].astype(np.float64)
        total = np.empty_like(piece) if on_root else None
        comm.Reduce(piece, total, op=MPI.SUM, root=root)
        if on_root:
            out[lo:lo + piece.size] = total / comm.Get_size()
    comm.Bcast(out, root=root)
    return out


#: A rank's own finding about its arguments: ``(exception type, message)``, or ``None``.
Problem = Optional[tuple[type, str]]


def agreement_error(gathered: Sequence[tuple[Problem, Any]], rank: int,
                    differ: Union[str, Callable[[list[Any]], str], None] = None) -> Optional[Exception]:
    """Pure: the error rank ``rank`` raises once every rank's ``(problem, value)`` was gathered
    (``gathered[r]`` is rank r's), the same on every rank; ``None`` when all is well.

    The first rank's problem wins, as its type and message (``" (on rank r)"`` added on the
    other ranks). Otherwise, when ``differ`` is given and the values are not all equal, a
    ``ValueError``: ``differ(values)``, or ``"{differ}; got rank 0: v0, rank 1: v1, ..."``."""
    for where, (problem, _) in enumerate(gathered):
        if problem is not None:
            kind, message = problem
            return kind(message + ("" if where == rank else f" (on rank {where})"))
    values = [value for _, value in gathered]
    if differ is None or all(value == values[0] for value in values[1:]):
        return None
    if callable(differ):
        return ValueError(differ(values))
    return ValueError(f"{differ}; got " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def agree(comm: Any, problem: Problem = None, value: Any = None, *,
          differ: Union[str, Callable[[list[Any]], str], None] = None) -> None:
    """Collective, one ``allgather`` of small objects: every rank raises the same error when
    any rank found a ``problem`` with its arguments, or (``differ`` given) when the ranks'
    ``value`` differ (see :func:`agreement_error`); otherwise every rank returns.

    Call it before the first collective that arguments can derail: a mistake on one rank then
    cannot leave the others waiting in a collective that rank never enters."""
    error = agreement_error(comm.allgather((problem, value)), comm.Get_rank(), differ)
    if error is not None:
        raise error


def first_problem(comm: Any, problem: Any) -> Any:
    """Collective: the lowest rank's ``problem`` that is set (any picklable value; ``None`` or
    empty is none), the same on every rank, or ``None`` when no rank has one."""
    return next((p for p in comm.allgather(problem) if p), None)
