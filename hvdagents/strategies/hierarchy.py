"""Node-leader hierarchy ("proxy nodes"): sums and averages over the ranks in which one rank
per node, not every rank, sends across the network. Used by ``LocalSGD(hierarchical=True)``,
``LocalSGD(node_period=k1)`` and ``DiLoCo(hierarchical=True)``, under both frameworks.

A sum of a host vector over all N ranks, on L nodes of ``local_size`` m = N / L ranks each:

1. ``Reduce`` to the node's leader (its local rank 0) over the node's communicator
   (``Split_type(COMM_TYPE_SHARED)``: the processes that share memory; on the simulated hosts
   of :mod:`hvdagents.testing`, the ranks of one host);
2. ``Allreduce`` among the L leaders (a communicator of the leaders only): the only traffic
   between nodes;
3. ``Bcast`` from the leader inside the node.

Every rank receives the same bits (the leader's). The sum is in the wire dtype at every stage
(float16 through an MPI op of our own: MPI has no half type); float64 results equal the flat
sum's up to the order of the additions.

Bytes across nodes per exchange of a vector of n elements of b bytes (:func:`cross_node_bytes`),
per node. Hierarchical: only the leader sends between nodes, what an all-reduce among the L
leaders sends per participant, 2(L − 1)/L · n·b with a bandwidth-optimal algorithm (n·b for
L = 2, whatever the algorithm), whatever MPI does inside the node. Flat: it depends on the MPI
all-reduce the ranks' Horovod runs. When every rank sends its vector's worth across nodes
(recursive doubling, Open MPI's choice for small vectors) a node sends m · 2(L − 1)/L · n·b:
the hierarchy sends m times fewer. A reduce-scatter/all-gather that halves at the nearest
rank first, with ranks numbered node by node (what Open MPI 4.1's default all-reduce did
for an 8 MB vector at 4 ranks), already sends only 2(L − 1)/L · n·b per node, the same as the hierarchy. Measured on
2 simulated hosts × 2 ranks, one exchange of 1,049,600 float64 values (tests/test_hierarchy_mpi.py):
8.41 MB left each host flat and 8.41 MB hierarchical under the default all-reduce, and 16.8 MB
flat under recursive doubling. One more number (8 bytes) crosses per sum: the Horovod
all-reduce that finds out whether every rank still trains (see :class:`HierarchicalSum`).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import numpy as np

from ..errors import ModelMismatchError
from ..runtime import no_mpi_world

__all__ = ["NodeHierarchy", "HierarchicalSum", "cross_node_bytes", "average_parameters", "node_hierarchy"]


_float16_sum: Any = None  # the MPI op, made on first use (importing has no side effects)


def _f16_sum(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    """The float16 sum, for MPI (which has no half type): ``inoutbuf += inbuf``."""
    out = np.frombuffer(inoutbuf, dtype=np.float16)
    out += np.frombuffer(inbuf, dtype=np.float16)


def _mpi_buffer(array: np.ndarray) -> tuple[list[Any], Any]:
    """``[buffer, datatype]`` for ``array`` and the sum op for its dtype."""
    from mpi4py import MPI

    global _float16_sum
    if array.dtype == np.float16:
        if _float16_sum is None:
            _float16_sum = MPI.Op.Create(_f16_sum, commute=True)
        return [array.view(np.uint16), MPI.UINT16_T], _float16_sum
    return [array, {"d": MPI.DOUBLE, "f": MPI.FLOAT}[array.dtype.char]], MPI.SUM


def cross_node_bytes(elements: int, itemsize: int, nodes: int, local_size: int, *, hierarchical: bool) -> int:
    """Bytes one node sends to the other nodes per sum of ``elements`` values of ``itemsize``
    bytes (see the module's docstring): ``2(L − 1)/L · n·b`` hierarchical (its leader, in a
    bandwidth-optimal all-reduce among the L leaders); flat, ``local_size`` times that, the
    bytes when every rank of the node sends as much across as a leader does (an all-reduce
    that is not aware of the nodes; one that is can send as little as the hierarchy). Pure."""
    per_participant = 2 * (nodes - 1) * elements * itemsize // nodes
    return per_participant if hierarchical else local_size * per_participant


class NodeHierarchy:
    """The node's communicator and the leaders' communicator. Collective constructor over
    ``comm`` (every rank, the same point); :meth:`close` frees them (collective too).

    ``local_size``: ranks on this node; ``nodes``: L; ``is_leader``: local rank 0.
    ``sent_across_nodes``: the bytes this rank sent to other nodes through :meth:`sum` so far,
    by :func:`cross_node_bytes` (0 on ranks that are not leaders)."""

    def __init__(self, *, comm: Any) -> None:
        from mpi4py import MPI

        rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        self.local_size = self.node.Get_size()
        self.is_leader = self.node.Get_rank() == 0
        self.leaders = comm.Split(0 if self.is_leader else MPI.UNDEFINED, key=rank)
        self.nodes = int(self.node.bcast(self.leaders.Get_size() if self.is_leader else None, root=0))
        self.sent_across_nodes = 0

    def sum(self, values: np.ndarray, wire: str) -> np.ndarray:
        """Collective over every rank, blocking: the sum of ``values`` (1-D, the same length
        on every rank) over all ranks, summed in dtype ``wire``: reduce inside the node,
        all-reduce among the leaders, broadcast inside the node. Returns float64, the same
        bits on every rank."""
        from mpi4py import MPI

        local = np.ascontiguousarray(values, dtype=np.dtype(wire))
        total = np.empty_like(local)
        send, op = _mpi_buffer(local)
        recv, _ = _mpi_buffer(total)
        self.node.Reduce(send, recv, op=op, root=0)
        if self.is_leader:
            self.leaders.Allreduce(MPI.IN_PLACE, recv, op=op)
            self.sent_across_nodes += cross_node_bytes(total.size, total.itemsize, self.nodes, self.local_size,
                                                       hierarchical=True)
        self.node.Bcast(recv, root=0)
        return total.astype(np.float64)

    def node_sum(self, values: np.ndarray, wire: str) -> np.ndarray:
        """Collective over the ranks of this node only, blocking: the sum of ``values`` over
        them, in dtype ``wire``; float64. Nothing crosses nodes."""
        local = np.ascontiguousarray(values, dtype=np.dtype(wire))
        total = np.empty_like(local)
        send, op = _mpi_buffer(local)
        recv, _ = _mpi_buffer(total)
        self.node.Allreduce(send, recv, op=op)
        return total.astype(np.float64)

    def close(self) -> None:
        """Collective: free both communicators. Idempotent."""
        from mpi4py import MPI

        for name in ("node", "leaders"):
            comm = getattr(self, name)
            if comm is not None and comm != MPI.COMM_NULL:
                comm.Free()
            setattr(self, name, None)


def node_hierarchy(params: Any) -> NodeHierarchy:
    """Collective over all ranks: a :class:`NodeHierarchy` over the job's MPI world, or the
    :class:`~hvdagents.errors.LauncherError` naming the fix when there is none (Gloo launch:
    Horovod 0.28 offers no process set per node without its own start-up options)."""
    context = params.context
    if not context.mpi_world:
        raise no_mpi_world(
            "hierarchical=True and LocalSGD(node_period=...) make one MPI communicator per node "
            "and one of the node leaders",
            "leave hierarchical=False and node_period=None",
        )
    return NodeHierarchy(comm=context.comm)


class HierarchicalSum:
    """A drop-in for an adapter's ``start_sum(values, wire, name)`` (same contract: collective
    over every rank, same length and name everywhere, returns a function that returns the sum
    in float64) that sums through a :class:`NodeHierarchy`.

    Ranks that left early (``close()`` under uneven data) wait in Horovod's join and take part
    in Horovod's collectives only, contributing zeros. So every sum first all-reduces one
    number through the adapter's Horovod ``start_sum`` (blocking): when every rank still
    trains, the sum goes through the hierarchy (blocking); else through Horovod, flat, as
    without a hierarchy."""

    def __init__(self, flat: Callable[..., Callable[[], np.ndarray]], hierarchy: NodeHierarchy) -> None:
        self.flat = flat
        self.hierarchy = hierarchy

    def all_training(self, name: str) -> bool:
        """Collective (Horovod, blocking): whether every rank is still training."""
        return bool(self.flat(np.ones(1), "float64", name + ".active")()[0] == self.hierarchy.size)

    def __call__(self, values: np.ndarray, wire: str, name: str) -> Callable[[], np.ndarray]:
        if not self.all_training(name):
            return self.flat(values, wire, name)
        total = self.hierarchy.sum(values, wire)
        return lambda: total


def _mask_checksum(mask: np.ndarray) -> float:
    """21 bits of the CRC-32 of ``mask``: its square is exact in float64."""
    return float(zlib.crc32(np.packbits(mask).tobytes()) >> 11)


def average_parameters(params: Any, summer: HierarchicalSum, *, node_only: bool = False) -> bool:
    """Collective: LocalSGD's average through the hierarchy. Every trainable element (the
    adapter's ``trainable_mask``) becomes its mean over all ranks (``node_only``: over the
    ranks of this node), summed in the parameters' host dtype; the other elements stay.
    Ranks that train different parameter sets get a
    :class:`~hvdagents.errors.ModelMismatchError` before any parameter is summed.

    When a rank has left (uneven data), the average over all ranks is Horovod's over the ranks
    still training, as without a hierarchy, and a node-only average is skipped (the node's
    communicator needs all of its ranks). Returns whether the parameters were averaged."""
    mask = np.asarray(params.trainable_mask(), dtype=bool)
    checksum = _mask_checksum(mask)
    name = "hvdagents.hierarchy.node" if node_only else "hvdagents.hierarchy.all"
    active, sums, squares = summer.flat(np.array([1.0, checksum, checksum * checksum]), "float64",
                                        name + ".control")()
    if sums != active * checksum or squares != active * checksum * checksum:
        raise ModelMismatchError(
            "the ranks average different sets of parameters. Every rank must freeze and unfreeze the same "
            "parameters (requires_grad) and add the same param groups to its optimizer, at the same step."
        )
    values = params.get_flat()
    wire = np.dtype(params.dtype).name
    masked = np.where(mask, values, 0)
    everyone = active == summer.hierarchy.size
    if node_only:
        if not everyone:
            return False
        total, count = summer.hierarchy.node_sum(masked, wire), summer.hierarchy.local_size
    elif everyone:
        total, count = summer.hierarchy.sum(masked, wire), summer.hierarchy.size
    else:
        total, count = summer.flat(masked, wire, name)(), active
    params.set_flat(np.where(mask, total / count, values.astype(np.float64)))
    return True
