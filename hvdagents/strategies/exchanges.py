"""Exchanges: how an asynchronous agent shares its parameters, one object per strategy.

An exchange owns its windows and does one strategy's communication; the
:class:`~.weak.AsyncRunner` decides *when* (every ``period`` steps) and runs the lifecycle.
Every method says whether it is collective; :meth:`Exchange.exchange` never is.

- :class:`DownpourExchange` — push the change since the last pull into a centre
  (:class:`~.windows.ParameterWindow`), pull the centre (Dean et al. 2012); optionally each
  push scaled by 1/τ, τ the updates the centre received since this agent's pull (Zhang et
  al. 2016, staleness-aware async SGD).
- :class:`EASGDExchange` — elastic averaging against the same kind of centre (Zhang,
  Choromanska, LeCun 2015).
- :class:`GossipExchange` — no centre: pairwise averaging that moves both sides (AD-PSGD,
  Lian et al. 2018), the peer's half delivered to its :class:`~.windows.InboxWindow`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import numpy as np

from ..collectives import mean_over_ranks
from .base import ParameterAccess
from .config import EASGD, Downpour, Gossip, Strategy
from .windows import ClockWindow, InboxWindow, ParameterWindow, PeerWindow

__all__ = ["Exchange", "CentreExchange", "DownpourExchange", "EASGDExchange", "GossipExchange"]


class Exchange(ABC):
    """One strategy's parameter sharing. Construction is collective (it creates windows)."""

    def __init__(self, strategy: Strategy, n: int, dtype: np.dtype, comm: Any) -> None:
        self.strategy = strategy
        self.comm = comm
        self.dtype = np.dtype(dtype)
        self.n = int(n)

    @classmethod
    def check_world(cls, strategy: Strategy, size: int) -> None:
        """Raise ``ValueError`` when the settings do not fit a world of ``size`` ranks
        (before any window exists; the same outcome on every rank)."""

    def _flat(self, params: ParameterAccess) -> np.ndarray:
        return np.asarray(params.get_flat(), dtype=self.dtype)

    @abstractmethod
    def seed(self, params: ParameterAccess) -> None:
        """Collective: the shared state and every rank's model start from rank 0's model."""

    @abstractmethod
    def exchange(self, params: ParameterAccess) -> None:
        """One-sided: share this agent's progress and take in the others'."""

    def settle(self, params: ParameterAccess) -> None:
        """One-sided: this agent's last contribution, before the final barrier."""

    @abstractmethod
    def consensus(self, params: ParameterAccess) -> np.ndarray:
        """Collective, after every agent settled: the one model every rank ends with
        (bit-identical everywhere)."""

    def snapshot(self) -> Optional[np.ndarray]:
        """One-sided: shared state a checkpoint must keep beside the model (``None``: none)."""
        return None

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: resume from a checkpoint; ``saved`` is rank 0's :meth:`snapshot` (read
        on rank 0 only). Without one, start again from the model (:meth:`seed`)."""
        self.seed(params)

    @abstractmethod
    def close(self) -> None:
        """Collective: free the windows."""


class CentreExchange(Exchange):
    """Downpour and EASGD: a centre vector sharded over the ranks (:class:`ParameterWindow`)."""

    def __init__(self, strategy: Strategy, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm)
        self.store = ParameterWindow(self.n, self.dtype, comm=comm)

    def seed(self, params: ParameterAccess) -> None:
        self.store.init(self._flat(params) if self.comm.Get_rank() == 0 else None)
        self._take_centre(params, self.store.pull())

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        """Set the model to a freshly pulled ``centre``."""
        params.set_flat(centre)

    def consensus(self, params: ParameterAccess) -> np.ndarray:
        return self.store.pull()

    def snapshot(self) -> Optional[np.ndarray]:
        """The centre (one-sided pull: no other rank takes part)."""
        return self.store.pull()

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """The centre becomes the saved one; the models keep rank 0's saved model (already on
        every rank), except where the strategy's model is the centre itself (Downpour)."""
        if self.comm.bcast(saved is None, root=0):
            self.seed(params)
            return
        self.store.init(saved if self.comm.Get_rank() == 0 else None)

    def close(self) -> None:
        self.store.close()


class DownpourExchange(CentreExchange):
    """Every exchange: push the change since the last pull (divided by ``period`` when
    ``normalize``; by τ when ``staleness_aware``), then pull the centre into the model.
    ``settle`` pushes the change of the steps since the last exchange, so no work is lost."""

    strategy: Downpour

    def __init__(self, strategy: Downpour, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm)
        self._pushes = ClockWindow(comm=comm) if strategy.staleness_aware else None
        self._version = 0  # pushes the centre had received when this agent last pulled
        self.last_staleness = 1

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        self._pulled = centre  # never written again: later pulls make new arrays
        params.set_flat(centre)

    def _pull(self, params: ParameterAccess) -> None:
        if self._pushes is not None:  # read before the pull: the pull holds at least these
            self._version = int(self._pushes.clocks().sum())
        self._take_centre(params, self.store.pull())

    def seed(self, params: ParameterAccess) -> None:
        self.store.init(self._flat(params) if self.comm.Get_rank() == 0 else None)
        self._pull(params)

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        super().restore(params, saved)
        self._pull(params)

    def _push_change(self, params: ParameterAccess) -> None:
        delta = self._flat(params) - self._pulled
        if self.strategy.normalize:
            delta /= self.strategy.period
        if self._pushes is not None:
            # τ: updates the centre received since this agent's pull, its own one included
            self.last_staleness = int(self._pushes.clocks().sum()) - self._version + 1
            delta /= self.last_staleness
        self.store.push(delta)
        if self._pushes is not None:
            self._pushes.tick()

    def exchange(self, params: ParameterAccess) -> None:
        self._push_change(params)
        self._pull(params)

    def settle(self, params: ParameterAccess) -> None:
        self._push_change(params)

    def close(self) -> None:
        super().close()
        if self._pushes is not None:
            self._pushes.close()


#: EASGD's centre moves by alpha times the sum of the agents' differences: with p agents its
#: own update is c <- (1 - p alpha) c + ..., undamped (oscillating) once p alpha reaches this.
EASGD_UNSTABLE_BETA = 2.0


class EASGDExchange(CentreExchange):
    """Every exchange: read the centre c, move ``alpha (x - c)`` from the model to the centre."""

    strategy: EASGD

    @classmethod
    def check_world(cls, strategy: Strategy, size: int) -> None:
        beta = strategy.alpha * size
        if beta >= EASGD_UNSTABLE_BETA:
            raise ValueError(
                f"EASGD.alpha × agents must be < {EASGD_UNSTABLE_BETA:g}, or the centre oscillates without "
                f"damping (it moves by alpha times the sum of the {size} agents' differences); got "
                f"{strategy.alpha} × {size} = {beta:g}. Use alpha = 0.9 / {size} = {0.9 / size:.3g} "
                "(Zhang et al. 2015: β = 0.9)."
            )

    def exchange(self, params: ParameterAccess) -> None:
        x = self._flat(params)  # a fresh host copy: updated in place
        elastic = x - self.store.pull()
        elastic *= self.strategy.alpha
        x -= elastic
        self.store.push(elastic)
        params.set_flat(x)


class GossipExchange(Exchange):
    """Average-preserving gossip through one-sided windows.

    Every exchange: take what peers delivered to this agent's inbox into the model, then for
    each peer j (one random peer with ``weights=None``, weight 1; else every j with
    ``W[i, j] > 0``) read j's published model x_j and move by ``d = w (x_j - x) / 2``
    while delivering ``-d`` to j's inbox; finally publish the result. With one random peer
    both sides end at (x + x_j) / 2 (AD-PSGD's pairwise average, both models updated); with a
    matrix, a round of exchanges by every agent applies (W + Wᵀ) / 2, W itself when W is
    symmetric. Nothing is created or lost: the sum of all models and inboxes never changes,
    so the mean of the models is preserved whatever the order of exchanges, and ``finish``
    ends at that mean exactly.
    """

    strategy: Gossip

    def __init__(self, strategy: Gossip, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._weights = strategy.matrix(self.size)
        self.peers = PeerWindow(self.n, self.dtype, comm=comm)
        self.inbox = InboxWindow(self.n, self.dtype, comm=comm)
        self._rng = np.random.default_rng(strategy.seed + self.rank)
        self._scratch = np.empty(self.n, self.dtype)

    @classmethod
    def check_world(cls, strategy: Strategy, size: int) -> None:
        strategy.matrix(size)

    def seed(self, params: ParameterAccess) -> None:
        x = self._flat(params).copy()
        self.comm.Bcast(x, root=0)
        params.set_flat(x)
        self.inbox.take(out=self._scratch)  # callers made sure nothing is in flight: drop leftovers
        self.peers.publish(x)
        self.comm.Barrier()  # every window holds the new parameters before anyone reads it

    def _partners(self) -> list[tuple[int, float]]:
        if self._weights is None:
            peer = int(self._rng.integers(self.size - 1))
            return [(peer + (peer >= self.rank), 0.5)]
        row = self._weights[self.rank]
        return [(int(j), 0.5 * float(row[j])) for j in np.flatnonzero(row > 0) if j != self.rank]

    def exchange(self, params: ParameterAccess) -> None:
        x = self._flat(params)
        x += self.inbox.take(out=self._scratch)
        if self.size > 1:
            moved = np.zeros_like(x)
            for peer, weight in self._partners():
                d = self.peers.read(peer, out=self._scratch)
                d -= x
                d *= weight
                moved += d
                self.inbox.deliver(peer, np.negative(d))
            x += moved
        self.peers.publish(x)
        params.set_flat(x)

    def consensus(self, params: ParameterAccess) -> np.ndarray:
        """The exact mean of all models once every inbox is emptied into its owner, the same
        bits on every rank (:func:`~hvdagents.collectives.mean_over_ranks`: float64 sums on rank
        0, in pieces)."""
        local = self._flat(params)
        local += self.inbox.take(out=self._scratch)
        return mean_over_ranks(self.comm, local, np.empty_like(local))

    def close(self) -> None:
        self.peers.close()
        self.inbox.close()
