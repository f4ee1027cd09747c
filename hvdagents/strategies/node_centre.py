"""The node-leader centre ("proxy nodes" for the centre strategies): ``hierarchical=True`` of
``Downpour``, ``EASGD`` and ``AsyncDiLoCo``.

Flat, every agent pushes to and pulls from the centre on its own, one-sidedly: per exchange of
every agent, each of a node's m ranks sends its whole change and receives the whole centre,
and the part held on other nodes, (L − 1)/L of it, crosses the network. With a
:class:`NodeCentre`, the centre is sharded over one **leader** per node (its local rank 0, in
the leaders' communicator of a :class:`~.hierarchy.NodeHierarchy`), and the ranks of a node
exchange **together**:

- :meth:`NodeCentre.push`: ``Reduce`` (sum) of the ranks' contributions to the leader over the
  node's communicator (shared memory), then one one-sided push of the node's sum by the leader;
- :meth:`NodeCentre.pull`: one one-sided pull by the leader, then ``Bcast`` inside the node.

So only the leader sends across the network, once per node exchange: per node,
``2(L − 1)/L · n·b`` bytes (its push out, the answers to other leaders' pulls) instead of
``m`` times that (:func:`~.hierarchy.cross_node_bytes` with ``hierarchical`` True and False).

What changes semantically: an exchange is collective (blocking) over the ranks of a node, who
reach it at the same step counts (the same ``period``). A straggler holds back the ranks of its
own node, not those of the other nodes; the centre receives one push per node exchange (the sum
of the node's contributions, computed from the same pulled centre), so staleness counts node
pushes. Ranks that finish early (uneven data) keep joining their node's exchanges with nothing
to add, until every rank of the node has finished (each exchange carries the count of finished
ranks with the sum).

The node and leader communicators are made once per process (the first hierarchical centre,
collective over the world) and kept until MPI finalizes, as window layouts are cached per
communicator (:func:`~.windows.relay.layout_for`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .hierarchy import NodeHierarchy, _mpi_buffer
from .windows import ClockWindow, ParameterWindow

__all__ = ["NodeCentre"]

_HIERARCHIES: dict[int, NodeHierarchy] = {}  # by the world communicator's handle


def _hierarchy_for(comm: Any) -> NodeHierarchy:
    """Collective the first time per process and communicator: the cached node hierarchy."""
    key = comm.py2f()
    if key not in _HIERARCHIES:
        _HIERARCHIES[key] = NodeHierarchy(comm=comm)
    return _HIERARCHIES[key]


class NodeCentre:
    """A centre of ``n`` values of ``dtype`` sharded over the node leaders of ``comm``.

    Collective constructor over every rank of ``comm``; ``clock``: the leaders also keep a
    :class:`~.windows.ClockWindow` that counts node pushes (staleness-aware Downpour).
    ``store`` and ``pushes`` are ``None`` on ranks that are not leaders."""

    def __init__(self, n: int, dtype: np.dtype, *, comm: Any, clock: bool = False) -> None:
        self.comm = comm
        self.hierarchy = _hierarchy_for(comm)
        self.is_leader = self.hierarchy.is_leader
        self.local_size = self.hierarchy.local_size
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        leaders = self.hierarchy.leaders
        self.store = ParameterWindow(self.n, self.dtype, comm=leaders) if self.is_leader else None
        self.pushes = ClockWindow(comm=leaders) if clock and self.is_leader else None
        self._send = np.empty(self.n + 1, self.dtype)  # the contribution, then 1 if finished
        self._sum = np.empty(self.n + 1, self.dtype) if self.is_leader else None
        self._count = np.empty(1, self.dtype)

    def init(self, values: Optional[np.ndarray]) -> None:
        """Collective over every rank: the centre becomes rank 0's ``values`` (others: ``None``)."""
        if self.is_leader:
            self.store.init(values if self.comm.Get_rank() == 0 else None)

    def pull(self) -> np.ndarray:
        """Collective over the ranks of this node, blocking: the leader pulls the centre
        (one-sided) and broadcasts it; every rank of the node returns the same bits (a new
        array, never written again here)."""
        centre = self.store.pull() if self.is_leader else np.empty(self.n, self.dtype)
        self.hierarchy.node.Bcast(_mpi_buffer(centre)[0], root=0)
        return centre

    def push(self, contribution: Optional[np.ndarray], *, finished: bool,
             on_leader: Optional[Callable[[np.ndarray], None]] = None) -> bool:
        """Collective over the ranks of this node, blocking: the node's ranks sum their
        ``contribution`` (``None``: nothing) to the leader, which calls ``on_leader(total)``
        (may scale it in place) and pushes the total into the centre (one-sided; element-wise
        atomic: concurrent pushes of other nodes are never lost); a total of zeros is not
        pushed. ``finished``: this rank has finished training. Returns, on every rank of the
        node alike, whether every rank of the node has finished."""
        if contribution is None:
            self._send[:-1] = 0
        else:
            self._send[:-1] = contribution
        self._send[-1] = 1 if finished else 0
        send, op = _mpi_buffer(self._send)
        self.hierarchy.node.Reduce(send, _mpi_buffer(self._sum)[0] if self.is_leader else None, op=op, root=0)
        if self.is_leader:
            total = self._sum[:-1]
            self._count[0] = self._sum[-1]
            if np.any(total):
                if on_leader is not None:
                    on_leader(total)
                self.store.push(total)
                if self.pushes is not None:
                    self.pushes.tick()
        self.hierarchy.node.Bcast(_mpi_buffer(self._count)[0], root=0)
        return int(self._count[0]) == self.local_size

    def snapshot(self) -> np.ndarray:
        """One-sided, on a leader (rank 0 saves checkpoints): the centre."""
        return self.store.pull()

    def close(self) -> None:
        """Collective over every rank: free the leaders' windows (the communicators stay)."""
        if self.store is not None:
            self.store.close()
        if self.pushes is not None:
            self.pushes.close()
