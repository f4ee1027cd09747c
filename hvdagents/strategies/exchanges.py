"""Exchanges: how an asynchronous agent shares its parameters, one object per strategy.

An exchange owns its windows and does one strategy's communication; the
:class:`~.async_runner.AsyncRunner` decides *when* (every ``period`` steps) and runs the lifecycle.
Every method says whether it is collective; :meth:`Exchange.exchange` never is over all ranks
(with ``hierarchical=True``, over the ranks of one node).

- :class:`DownpourExchange` — push the change since the last pull into a centre
  (:class:`~.windows.ParameterWindow`), pull the centre (Dean et al. 2012); optionally each
  push scaled by 1/τ, τ the updates the centre received since this agent's pull (Zhang et
  al. 2016, staleness-aware async SGD).
- :class:`EASGDExchange` — elastic averaging against the same kind of centre (Zhang,
  Choromanska, LeCun 2015).
- :class:`GossipExchange` — no centre: pairwise averaging that moves both sides (AD-PSGD,
  Lian et al. 2018): each agent's effective model lives in an :class:`~.windows.InboxWindow`
  that peers read and deliver their half of an exchange to.

With ``hierarchical=True`` the centre exchanges (Downpour, EASGD, AsyncDiLoCo) go through a
:class:`~.node_centre.NodeCentre`: the centre is sharded over one leader per node and the ranks
of a node exchange together (their contributions summed inside the node, one push and one pull
per node by its leader), so there :meth:`Exchange.exchange` is collective over the node's ranks.

Nothing non-finite is shared: what an exchange would write (Downpour's change, EASGD's elastic
difference, Gossip's model) is checked first with one ``np.isfinite`` pass over the flat vector
(2-4 ms for 10^7 elements here, a few times less than the subtraction that builds it), and a
NaN or infinity raises :class:`~hvdagents.errors.NonFiniteError` on this rank before any
window changes: one such push would otherwise stay in the centre, or in a peer's model, for
every agent and the rest of the run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import numpy as np

from ..collectives import mean_over_ranks
from ..errors import NonFiniteError
from .base import ParameterAccess
from .config import EASGD, Downpour, Gossip, Strategy
from .node_centre import NodeCentre
from .windows import ClockWindow, InboxWindow, ParameterWindow

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

    def _refuse_nonfinite(self, values: np.ndarray, params: ParameterAccess, what: str) -> None:
        """Raise :class:`NonFiniteError` naming the first parameter of ``values`` (a vector in
        :meth:`ParameterAccess.get_flat` order) that holds a NaN or an infinity. Local."""
        if np.isfinite(values).all():
            return
        index = int(np.argmin(np.isfinite(values)))
        sizes = params.parameter_sizes()
        ends = np.cumsum([size for _, size in sizes])
        name = sizes[int(np.searchsorted(ends, index, side="right"))][0]
        raise NonFiniteError(type(self.strategy).__name__, name, float(values[index]), what)

    @abstractmethod
    def seed(self, params: ParameterAccess) -> None:
        """Collective: the shared state and every rank's model start from rank 0's model."""

    @abstractmethod
    def exchange(self, params: ParameterAccess) -> None:
        """One-sided (hierarchical centre: collective over the node's ranks): share this
        agent's progress and take in the others'."""

    def settle(self, params: ParameterAccess) -> None:
        """One-sided: this agent's last contribution, before the final barrier."""

    @abstractmethod
    def consensus(self, params: ParameterAccess) -> np.ndarray:
        """Collective, after every agent settled: the one model every rank ends with
        (bit-identical everywhere)."""

    def snapshot(self) -> Optional[np.ndarray]:
        """One-sided: shared state a checkpoint must keep beside the model (``None``: none)."""
        return None

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        """The shape of :meth:`snapshot` (a loaded checkpoint's is checked against it). Pure."""
        return (num_parameters,)

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: resume from a checkpoint; ``saved`` is rank 0's :meth:`snapshot` (read
        on rank 0 only). Without one, start again from the model (:meth:`seed`)."""
        self.seed(params)

    @abstractmethod
    def close(self) -> None:
        """Collective: free the windows."""


class CentreExchange(Exchange):
    """Downpour, EASGD and AsyncDiLoCo: a centre vector sharded over the ranks
    (:class:`ParameterWindow`), or, with ``hierarchical=True``, over one leader per node
    (:class:`~.node_centre.NodeCentre`: the ranks of a node push their sum and pull together).

    The centre is reached through :meth:`_pull_centre` and :meth:`_push_centre`: one-sided
    flat; collective over the node's ranks (blocking) when hierarchical. ``self.store`` is the
    window (``None`` on a hierarchical rank that is not a leader)."""

    def __init__(self, strategy: Strategy, n: int, dtype: np.dtype, comm: Any, *, clock: bool = False) -> None:
        super().__init__(strategy, n, dtype, comm)
        self.node: Optional[NodeCentre] = None
        self._pushes: Optional[ClockWindow] = None  # pushes into the centre (hierarchical: node pushes)
        if getattr(strategy, "hierarchical", False):
            self.node = NodeCentre(self.n, self.dtype, comm=comm, clock=clock)
            self.store = self.node.store
            self._pushes = self.node.pushes
        else:
            self.store = ParameterWindow(self.n, self.dtype, comm=comm)
            self._pushes = ClockWindow(comm=comm) if clock else None

    def _init_centre(self, values: Optional[np.ndarray]) -> None:
        """Collective: the centre becomes rank 0's ``values``."""
        if self.node is not None:
            self.node.init(values)
        else:
            self.store.init(values)

    def _pull_centre(self) -> np.ndarray:
        """The centre (a new array): one-sided flat; collective over the node hierarchical."""
        return self.node.pull() if self.node is not None else self.store.pull()

    def _push_centre(self, delta: Optional[np.ndarray], *, finished: bool = False,
                     on_leader: Optional[Callable[[np.ndarray], None]] = None) -> bool:
        """Add ``delta`` to the centre (``None``: nothing). Flat: one-sided, ``on_leader``
        applied to ``delta`` first; returns True. Hierarchical: the node's sum, pushed by its
        leader (:meth:`NodeCentre.push`); returns whether every rank of the node finished."""
        if self.node is not None:
            return self.node.push(delta, finished=finished, on_leader=on_leader)
        if delta is not None:
            if on_leader is not None:
                on_leader(delta)
            self.store.push(delta)
        return True

    def _settle_node(self, first: Callable[[], bool], idle: Callable[[], bool]) -> None:
        """Hierarchical ``settle``: ``first()`` (this rank's last exchange, marked finished),
        then ``idle()`` (the same exchange with nothing to add) while another rank of the node
        still trains: exchanges are collective over the node, so this rank takes part in them
        until every rank of the node has finished (uneven data)."""
        done = first()
        while not done:
            done = idle()

    def seed(self, params: ParameterAccess) -> None:
        self._init_centre(self._flat(params) if self.comm.Get_rank() == 0 else None)
        centre = self._pull_centre()
        self.comm.Barrier()  # no rank pushes before every rank has read rank 0's start
        self._take_centre(params, centre)

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        """Set the model to a freshly pulled ``centre``."""
        params.set_flat(centre)

    def consensus(self, params: ParameterAccess) -> np.ndarray:
        return self._pull_centre()

    def snapshot(self) -> Optional[np.ndarray]:
        """The centre (one-sided pull on rank 0, a leader: no other rank takes part)."""
        return self.store.pull()

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """The centre becomes the saved one; the models keep rank 0's saved model (already on
        every rank), except where the strategy's model is the centre itself (Downpour)."""
        if self.comm.bcast(saved is None, root=0):
            self.seed(params)
            return
        self._init_centre(saved if self.comm.Get_rank() == 0 else None)

    def close(self) -> None:
        if self.node is not None:
            self.node.close()
            return
        self.store.close()
        if self._pushes is not None:
            self._pushes.close()


class DownpourExchange(CentreExchange):
    """Every exchange: push the change since the last pull (divided by ``period`` when
    ``normalize``; by τ when ``staleness_aware``), then pull the centre into the model.
    ``settle`` pushes the change of the steps since the last exchange, so no work is lost.

    Hierarchical: the ranks of a node push the sum of their changes (each divided by
    ``period``; the sum by τ, counted in node pushes) and pull the centre together."""

    strategy: Downpour

    def __init__(self, strategy: Downpour, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm, clock=strategy.staleness_aware)
        self._version = 0  # pushes the centre had received when this agent last pulled
        self.last_staleness = 1

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        self._pulled = centre  # never written again: later pulls make new arrays
        params.set_flat(centre)

    def _pull(self, params: ParameterAccess) -> None:
        if self._pushes is not None:  # read before the pull: the pull holds at least these
            self._version = int(self._pushes.clocks().sum())
        self._take_centre(params, self._pull_centre())

    def seed(self, params: ParameterAccess) -> None:
        self._init_centre(self._flat(params) if self.comm.Get_rank() == 0 else None)
        self._pull(params)
        self.comm.Barrier()  # no rank pushes before every rank has read rank 0's start

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        super().restore(params, saved)
        self._pull(params)

    def _by_staleness(self, delta: np.ndarray) -> None:
        """τ: updates the centre received since this agent's (node's) pull, its own included."""
        self.last_staleness = int(self._pushes.clocks().sum()) - self._version + 1
        delta /= self.last_staleness

    def _push_change(self, params: ParameterAccess, *, finished: bool = False) -> bool:
        delta = self._flat(params) - self._pulled
        if self.strategy.normalize:
            delta /= self.strategy.period
        self._refuse_nonfinite(delta, params, "the change to push into the centre")
        done = self._push_centre(delta, finished=finished,
                                 on_leader=self._by_staleness if self._pushes is not None else None)
        if self._pushes is not None and self.node is None:
            self._pushes.tick()  # (hierarchical: the leader ticks once per node push)
        return done

    def exchange(self, params: ParameterAccess) -> None:
        self._push_change(params)
        self._pull(params)

    def settle(self, params: ParameterAccess) -> None:
        if self.node is None:
            self._push_change(params)
            return

        def idle() -> bool:
            self._pull_centre()  # the pull of the exchange the node's other ranks are in
            return self._push_centre(None, finished=True)

        self._settle_node(lambda: self._push_change(params, finished=True), idle)


#: EASGD's centre moves by alpha times the sum of the agents' differences: with p agents its
#: own update is c <- (1 - p alpha) c + ..., undamped (oscillating) once p alpha reaches this.
EASGD_UNSTABLE_BETA = 2.0


class EASGDExchange(CentreExchange):
    """Every exchange: read the centre c, move ``alpha (x - c)`` from the model to the centre.

    Hierarchical: the ranks of a node read the centre their leader pulled, and their leader
    pushes the sum of their elastic differences."""

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
        elastic = x - self._pull_centre()
        elastic *= self.strategy.alpha
        self._refuse_nonfinite(elastic, params, "the elastic difference to push into the centre")
        x -= elastic
        self._push_centre(elastic)
        params.set_flat(x)

    def settle(self, params: ParameterAccess) -> None:
        """Flat: nothing. Hierarchical: this rank's node exchanges (a pull, then a push of
        nothing) until every rank of its node has finished."""
        if self.node is None:
            return

        def idle() -> bool:
            self._pull_centre()
            return self._push_centre(None, finished=True)

        self._settle_node(idle, idle)


class GossipExchange(Exchange):
    """Average-preserving gossip through one-sided windows.

    Each agent's :class:`~.windows.InboxWindow` holds its *effective* model: what it last
    published plus every change peers delivered since. Every exchange: fold what peers
    delivered into the model, then for each peer j (one random peer with ``weights=None``,
    weight 1; else every j with ``W[i, j] > 0``) read j's effective model y_j and move by
    ``d = w (y_j - x) / 2`` while delivering ``-d`` to j; finally publish the result (add
    to the own window what changed since the last publication). With one random peer both
    sides end at (x + y_j) / 2 (AD-PSGD's pairwise average, both models updated); with a
    matrix, a round of exchanges by every agent applies (W + Wᵀ) / 2, W itself when W is
    symmetric. Nothing is created or lost: the sum of all models never changes, so the mean
    is preserved whatever the order of exchanges, and ``finish`` ends at that mean exactly.
    Reading the effective model (not only the last publication) matters when a peer is
    slow: repeated exchanges with it converge to it instead of piling up changes it would
    take all at once later.
    """

    strategy: Gossip

    def __init__(self, strategy: Gossip, n: int, dtype: np.dtype, comm: Any) -> None:
        super().__init__(strategy, n, dtype, comm)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._weights = strategy.matrix(self.size)
        self.models = InboxWindow(self.n, self.dtype, comm=comm)
        self._rng = np.random.default_rng(strategy.seed + self.rank)
        self._published = np.zeros(self.n, self.dtype)  # the model as of the last publication
        self._scratch = np.empty(self.n, self.dtype)
        self._changed = np.empty(self.n, self.dtype)
        self._moved: Optional[np.ndarray] = None  # only for a matrix with several peers per row

    @classmethod
    def check_world(cls, strategy: Strategy, size: int) -> None:
        strategy.matrix(size)

    def seed(self, params: ParameterAccess) -> None:
        x = self._flat(params).copy()
        self.comm.Bcast(x, root=0)
        params.set_flat(x)
        self.models.take(out=self._scratch)  # callers made sure nothing is in flight: empty it
        self.models.deliver(self.rank, x)
        self._published[:] = x
        self.comm.Barrier()  # every window holds the new parameters before anyone reads it

    def _partners(self) -> list[tuple[int, float]]:
        if self._weights is None:
            peer = int(self._rng.integers(self.size - 1))
            return [(peer + (peer >= self.rank), 0.5)]
        row = self._weights[self.rank]
        return [(int(j), 0.5 * float(row[j])) for j in np.flatnonzero(row > 0) if j != self.rank]

    def _fold_deliveries(self, x: np.ndarray) -> None:
        """Add to ``x`` what peers delivered since the last publication."""
        delivered = self.models.read(self.rank, out=self._scratch)
        delivered -= self._published
        x += delivered

    def exchange(self, params: ParameterAccess) -> None:
        x = self._flat(params)
        self._refuse_nonfinite(x, params, "the model to average with peers")
        np.subtract(x, self._published, out=self._changed)  # own progress since publishing
        self._fold_deliveries(x)
        if self.size > 1:
            partners = self._partners()
            moved = None
            if len(partners) > 1:  # every move is computed from the same x: collect them first
                if self._moved is None:
                    self._moved = np.empty(self.n, self.dtype)
                moved = self._moved
                moved.fill(0)
            for peer, weight in partners:
                d = self.models.read(peer, out=self._scratch)
                d -= x
                d *= weight
                self._changed += d
                if moved is None:
                    x += d
                else:
                    moved += d
                np.negative(d, out=d)
                self.models.deliver(peer, d)
            if moved is not None:
                x += moved
        self.models.deliver(self.rank, self._changed)  # publish: the window now holds x
        self._published[:] = x
        params.set_flat(x)

    def settle(self, params: ParameterAccess) -> None:
        """Refuse a non-finite model before the consensus averages it into every rank's."""
        self._refuse_nonfinite(self._flat(params), params, "the model to average at close()")

    def consensus(self, params: ParameterAccess) -> np.ndarray:
        """The exact mean of all models once every delivery is folded into its owner, the same
        bits on every rank (:func:`~hvdagents.collectives.mean_over_ranks`: float64 sums on rank
        0, in pieces)."""
        local = self._flat(params)
        self._fold_deliveries(local)
        return mean_over_ranks(self.comm, local, np.empty_like(local))

    def close(self) -> None:
        self.models.close()
