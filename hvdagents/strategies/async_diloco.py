"""Asynchronous DiLoCo: DiLoCo's outer step applied to a centre in the sharded store.

Every ``inner_steps`` (H) local steps an agent computes its pseudo-gradient
Δ = θ_pulled − θ_local (θ_pulled: the centre it pulled last), steps its **own** outer
momentum buffer b ← μ·b + Δ (:class:`~.diloco.OuterSGD`, float64 on the host), pushes the
outer update −lr·(Δ + μ·b)/N (Nesterov; −lr·b/N without) into the centre, then pulls the
centre and continues from it. Nobody waits: a straggler pushes less often and holds nobody
back.

Where the outer momentum lives, and why it is exact:

- The centre only ever receives sums (``MPI_Accumulate(SUM)``, element-wise atomic), so
  concurrent pushes are never lost, whatever their order.
- Each agent keeps its own buffer b_i. The outer step is linear in (Δ, b), so when the N
  agents happen to push once each from the same centre, the centre moves by
  −lr·(mean Δ + μ·mean b) with mean b following b ← μ·b + mean Δ: synchronous DiLoCo's step
  (:class:`~.config.DiLoCo`, whose buffer is the mean of these). A global buffer in the store
  could not be exact: b ← μ·b + Δ is not a sum, so two concurrent pushes would race.
- Each b_i is also published in an :class:`~.windows.InboxWindow` (float64, written only by
  its owner: emptied, then set, both exact), so rank 0 reads every rank's buffer one-sidedly
  for a checkpoint and :meth:`AsyncDiLoCoExchange.restore` gives each rank its own buffer
  back, bit for bit, beside the centre. Every agent continues from the restored centre: an
  agent's local steps since its last push are not in a checkpoint (as under Downpour).

``hierarchical=True`` (:mod:`~.node_centre`): each rank still steps its own buffer; the ranks
of a node push the sum of their outer updates (by their leader) and pull the centre together,
once per node per outer step. Since the step is linear, a node's push equals its ranks' pushes
made one after the other from the same centre.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .base import ParameterAccess
from .config import AsyncDiLoCo
from .diloco import OuterSGD
from .exchanges import CentreExchange
from .windows import InboxWindow

__all__ = ["AsyncDiLoCoExchange"]


class AsyncDiLoCoExchange(CentreExchange):
    """The exchange of :class:`~.config.AsyncDiLoCo` (see the module docstring).

    ``exchange`` is one-sided: one push to the centre, one pull, and two operations on this
    rank's own momentum window. ``settle`` (at ``close()``) pushes the last pseudo-gradient
    when the model moved since the last pull. A checkpoint (:meth:`snapshot`, rank 0,
    one-sided) holds the centre and every rank's buffer, a ``(1 + N, n)`` float64 array; it
    loads with the same number of ranks (another number is refused by the agent's shape
    check, naming both shapes). Taken while other agents push, each element is whole but the
    rows need not be one instant's (as Downpour's centre); taken after a barrier, it is exact.
    """

    strategy: AsyncDiLoCo

    def __init__(self, strategy: AsyncDiLoCo, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.momenta = InboxWindow(self.n, np.float64, comm=comm)
        self.buffer = np.zeros(self.n, np.float64)  # this agent's outer momentum b_i
        self._outer = OuterSGD(strategy.outer_lr, strategy.outer_momentum, strategy.nesterov)
        self.outer_steps = 0  # pushes this agent made (for reports and tests)

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        return (1 + self.size, num_parameters)

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        self._pulled = centre  # never written again: later pulls make new arrays
        params.set_flat(centre)

    def _publish_buffer(self) -> None:
        """Make this rank's momentum window hold ``self.buffer`` exactly: only its owner writes
        it, so emptying it (x − x = 0) and adding the buffer (0 + b = b) are both exact."""
        self.momenta.take()
        self.momenta.deliver(self.rank, self.buffer)

    def seed(self, params: ParameterAccess) -> None:
        self.buffer.fill(0.0)
        self._publish_buffer()
        super().seed(params)  # the barrier in it: no rank pushes before every rank is ready

    def _push_outer_step(self, params: ParameterAccess, *, finished: bool = False) -> bool:
        delta = np.asarray(self._pulled, np.float64) - np.asarray(params.get_flat(), np.float64)
        self._refuse_nonfinite(delta, params, "the pseudo-gradient of the outer step")
        change = np.zeros(self.n, np.float64)
        self._outer.step(change, self.buffer, delta)  # change = −lr·(Δ + μ·b), b stepped in place
        change /= self.size
        self._publish_buffer()
        self.outer_steps += 1
        return self._push_centre(change.astype(self.dtype, copy=False), finished=finished)

    def exchange(self, params: ParameterAccess) -> None:
        self._push_outer_step(params)
        self._take_centre(params, self._pull_centre())

    def settle(self, params: ParameterAccess) -> None:
        local = np.asarray(params.get_flat())
        moved = not np.array_equal(local, self._pulled)
        if self.node is not None:  # the node's exchanges are collective: take part until all finished
            def idle() -> bool:
                self._pull_centre()  # the pull of the exchange the node's other ranks are in
                return self._push_centre(None, finished=True)

            first = (lambda: self._push_outer_step(params, finished=True)) if moved else \
                (lambda: self._push_centre(None, finished=True))
            self._settle_node(first, idle)
        elif moved:
            self._push_outer_step(params)
        if moved:
            self._pulled = local.copy()  # pushed: settling again pushes nothing

    def snapshot(self) -> Optional[np.ndarray]:
        """One-sided: row 0 the centre, row 1 + r rank r's momentum buffer (float64)."""
        rows = np.empty((1 + self.size, self.n), np.float64)
        rows[0] = self.store.pull()
        for rank in range(self.size):
            self.momenta.read(rank, out=rows[1 + rank])
        return rows

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: the centre and every rank's own buffer from rank 0's ``saved`` rows
        (``None``: start again from rank 0's model with zero buffers, as :meth:`seed`)."""
        if self.comm.bcast(saved is None, root=0):
            self.seed(params)
            return
        rows = np.asarray(saved, np.float64) if self.rank == 0 else None
        self._init_centre(rows[0].astype(self.dtype) if self.rank == 0 else None)
        self.comm.Scatter(rows[1:] if self.rank == 0 else None, self.buffer, root=0)
        self._publish_buffer()
        self._take_centre(params, self._pull_centre())
        self.comm.Barrier()  # every rank holds the restored state before anyone pushes

    def close(self) -> None:
        super().close()
        self.momenta.close()
