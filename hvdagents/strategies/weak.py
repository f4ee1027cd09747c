"""Runners of the weak (asynchronous) strategies: Downpour, EASGD, Gossip, bounded staleness.

Agents never wait for each other during training: they exchange parameters through MPI
one-sided windows (:mod:`.window`) every ``period`` local steps, each at its own pace.
Only :meth:`~WeakRunner.start` and :meth:`~WeakRunner.finish` are collective.

- :class:`DownpourRunner` — a parameter server on a sharded :class:`~.window.ParameterWindow`:
  push the change since the last pull, pull the centre (Dean et al. 2012).
- :class:`EASGDRunner` — elastic averaging against the same kind of centre
  (Zhang, Choromanska, LeCun 2015).
- :class:`GossipRunner` — no centre: each agent publishes its parameters in its own
  :class:`~.window.PeerWindow` and mixes in its peers' (Lian et al. 2018, AD-PSGD).

With ``max_staleness=s`` every step ticks a :class:`~.window.ClockWindow`
and no agent starts a step while it is more than ``s`` steps ahead of the slowest active
agent (Stale Synchronous Parallel). Agents that finish retire their clock first, so a
finished agent never holds the others back.

All windows are used with shared locks only (one ``Lock_all`` epoch per window), so no two
agents can deadlock on lock order, however their exchanges interleave.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import LauncherError, UsageError
from .base import ParameterAccess, Runner
from .config import EASGD, Downpour, Gossip, Strategy
from .window import SUPPORTED_DTYPES, ClockWindow, ParameterWindow, PeerWindow

__all__ = ["WeakRunner", "DownpourRunner", "EASGDRunner", "GossipRunner", "make_weak_runner", "mpi_world_comm"]

_NEW, _RUNNING, _FINISHED = "new", "running", "finished"

#: Elements summed per MPI call in Gossip's final average (float64 pieces of 32 MiB).
CONSENSUS_PIECE = 1 << 22


def mpi_world_comm() -> Any:
    """``COMM_WORLD``, or a LauncherError naming the fix when the launch has no MPI world."""
    from ..runtime import init

    ctx = init()
    if not ctx.mpi_world:
        raise LauncherError(
            "Asynchronous strategies (Downpour, EASGD, Gossip) share parameters through MPI "
            "one-sided windows, and this job was started by 'horovodrun --gloo', which has no "
            "MPI world. Launch with mpirun, srun --mpi=pmix, or horovodrun without --gloo; "
            "or use hva.Sync() / hva.LocalSGD() under Gloo."
        )
    return ctx.comm


class WeakRunner(Runner):
    """Common life of an asynchronous runner: step counting, the staleness bound, windows.

    ``start`` and ``finish`` are collective (every rank, once each, in that order);
    ``after_step`` is local to the calling agent apart from one-sided window operations
    every ``period`` steps (and, with ``max_staleness``, a clock tick every step and a wait
    for the slowest agent).
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._phase = _NEW
        self._comm: Any = None
        self._clock: Optional[ClockWindow] = None
        self._dtype = np.dtype(np.float64)

    # -- settings read by this class; subclasses override
    @property
    def max_staleness(self) -> Optional[int]:
        """The staleness bound in steps, or ``None`` for none."""
        return None

    @property
    def clock(self) -> Optional[ClockWindow]:
        """The staleness clock while running (``None`` without a bound); for monitoring only."""
        return self._clock

    # -- the three moments
    def start(self, params: ParameterAccess) -> None:
        """Collective: create the windows and start every agent from rank 0's parameters.

        Raises :class:`~hvdagents.errors.LauncherError` under ``horovodrun --gloo`` (no MPI
        world), and ``ValueError`` for settings that do not fit the world (a Gossip matrix of
        the wrong size) or parameters of an unsupported dtype, before any window exists.
        """
        if self._phase != _NEW:
            raise UsageError(
                f"start() was called on a {self._phase} {type(self).__name__}; a runner starts "
                "once. Make a new agent (or runner) to train again."
            )
        self._comm = mpi_world_comm()
        self._check_world(self._comm.Get_size())
        self._dtype = np.dtype(params.dtype)
        if self._dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{type(self.strategy).__name__} shares float32 or float64 parameters through its "
                f"windows; the model's parameters are {self._dtype}"
            )
        if self.max_staleness is not None:
            self._clock = ClockWindow(comm=self._comm)
        self._open(params)
        self._phase = _RUNNING

    def after_step(self, params: ParameterAccess) -> None:
        """Count the step; keep within the staleness bound; exchange every ``period`` steps.

        Not collective. Blocks only under ``max_staleness``, while this agent is more than
        that many steps ahead of the slowest active one.
        """
        self._require_running("after_step")
        self.state.step += 1
        if self._clock is not None:
            self._clock.tick()
            self._clock.wait_until_within(self.max_staleness)
        if self.state.step - self.state.last_sync_step >= self.strategy.period:
            self._exchange(params)
            self.state.last_sync_step = self.state.step

    def reseed(self, params: ParameterAccess) -> None:
        """Collective: the model was replaced (a checkpoint was loaded); restart the shared
        parameters (centre or published vectors) from rank 0's model, on every rank.

        Call it on every rank at the same step count (e.g. a checkpoint loaded before training
        resumes): under ``max_staleness`` a rank more than the bound ahead would otherwise
        wait forever in ``after_step`` for a rank that is inside this call. Clocks keep
        counting (the bound is relative). Before ``start`` it does nothing: ``start`` seeds
        from the model.
        """
        if self._phase == _NEW:
            return
        self._require_running("reseed")
        self._comm.Barrier()  # every rank's exchanges against the old parameters are complete
        self._seed(params)

    def finish(self, params: ParameterAccess) -> None:
        """Collective: leave one consensus model on every rank and free the windows.

        Retires this agent's clock (so agents still training are not held back), waits at a
        barrier for every agent (all pushes are then complete), sets the parameters to the
        consensus (bit-identical on every rank) and frees the windows. Idempotent.
        """
        if self._phase == _FINISHED:
            return
        self._require_running("finish")
        if self._clock is not None:
            self._clock.retire()
        self._settle(params)
        self._comm.Barrier()
        params.set_flat(self._consensus(params))
        self.state.last_sync_step = self.state.step
        self._close()
        if self._clock is not None:
            self._clock.close()
            self._clock = None
        self._phase = _FINISHED

    # -- helpers and hooks
    def _require_running(self, method: str) -> None:
        if self._phase == _NEW:
            raise UsageError(
                f"{method}() was called before start(): the agent starts the runner once, on "
                "every rank, after broadcasting rank 0's parameters."
            )
        if self._phase == _FINISHED:
            raise UsageError(
                f"{method}() was called after finish(): the runner's windows are freed. "
                "Make a new agent to train again."
            )

    def _flat(self, params: ParameterAccess) -> np.ndarray:
        return np.asarray(params.get_flat(), dtype=self._dtype)

    def _check_world(self, size: int) -> None:
        """Check the settings against the world size (same outcome on every rank)."""

    def _open(self, params: ParameterAccess) -> None:
        """Create the windows, then seed them (collective)."""
        raise NotImplementedError

    def _seed(self, params: ParameterAccess) -> None:
        """Collective: set the shared parameters and every rank's model from rank 0's model."""
        raise NotImplementedError

    def _exchange(self, params: ParameterAccess) -> None:
        raise NotImplementedError

    def _settle(self, params: ParameterAccess) -> None:
        """Last one-sided work of this agent before the final barrier."""

    def _consensus(self, params: ParameterAccess) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class _CentreRunner(WeakRunner):
    """Shared by Downpour and EASGD: a centre vector in a sharded :class:`ParameterWindow`."""

    strategy: Downpour | EASGD

    def __init__(self, strategy: Downpour | EASGD) -> None:
        super().__init__(strategy)
        self._store: Optional[ParameterWindow] = None

    @property
    def max_staleness(self) -> Optional[int]:
        return self.strategy.max_staleness

    def _open(self, params: ParameterAccess) -> None:
        self._store = ParameterWindow(int(params.num_parameters), self._dtype, comm=self._comm)
        self._seed(params)

    def _seed(self, params: ParameterAccess) -> None:
        self._store.init(self._flat(params) if self._comm.Get_rank() == 0 else None)
        self._take_centre(params, self._store.pull())

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        """Set the model to a freshly pulled ``centre`` (kept by runners that need it)."""
        params.set_flat(centre)

    def _consensus(self, params: ParameterAccess) -> np.ndarray:
        return self._store.pull()

    def _close(self) -> None:
        self._store.close()
        self._store = None


class DownpourRunner(_CentreRunner):
    """Downpour: every ``period`` steps push the change since the last pull, pull the centre.

    The change is divided by ``period`` when ``strategy.normalize``. ``finish`` pushes the
    change of the steps since the last exchange too, so no agent's work is dropped.
    """

    strategy: Downpour

    def _push_change(self, params: ParameterAccess) -> None:
        delta = self._flat(params) - self._pulled
        if self.strategy.normalize:
            delta /= self.strategy.period
        self._store.push(delta)

    def _take_centre(self, params: ParameterAccess, centre: np.ndarray) -> None:
        self._pulled = centre  # never written again: later pulls make new arrays
        params.set_flat(centre)

    def _exchange(self, params: ParameterAccess) -> None:
        self._push_change(params)
        self._take_centre(params, self._store.pull())

    def _settle(self, params: ParameterAccess) -> None:
        if self.state.step != self.state.last_sync_step:
            self._push_change(params)


class EASGDRunner(_CentreRunner):
    """EASGD: every ``period`` steps read the centre c, move ``alpha (x - c)`` from x to c."""

    strategy: EASGD

    def _exchange(self, params: ParameterAccess) -> None:
        x = self._flat(params)  # a fresh host copy: updated in place
        elastic = x - self._store.pull()
        elastic *= self.strategy.alpha
        x -= elastic
        self._store.push(elastic)
        params.set_flat(x)


class GossipRunner(WeakRunner):
    """Gossip: publish own parameters, then mix in peers' by the strategy's weights.

    ``weights=None``: one random peer j (seeded by ``strategy.seed + rank``) and
    ``x <- (x + x_j) / 2``. A matrix W: ``x_i <- sum_j W[i, j] x_j`` over the j with
    ``W[i, j] > 0``. Peers' vectors are read one-sided while they keep training. ``finish``
    replaces every agent's parameters by the exact average over all agents.
    """

    strategy: Gossip

    def __init__(self, strategy: Gossip) -> None:
        super().__init__(strategy)
        self._peers: Optional[PeerWindow] = None
        self._weights: Optional[np.ndarray] = None

    @property
    def max_staleness(self) -> Optional[int]:
        return self.strategy.max_staleness

    def _check_world(self, size: int) -> None:
        self._weights = self.strategy.matrix(size)

    def _open(self, params: ParameterAccess) -> None:
        comm = self._comm
        self._rank, self._size = comm.Get_rank(), comm.Get_size()
        n = int(params.num_parameters)
        self._peers = PeerWindow(n, self._dtype, comm=comm)
        self._rng = np.random.default_rng(self.strategy.seed + self._rank)
        self._scratch = np.empty(n, self._dtype)
        self._seed(params)

    def _seed(self, params: ParameterAccess) -> None:
        x = self._flat(params).copy()
        self._comm.Bcast(x, root=0)
        params.set_flat(x)
        self._peers.publish(x)
        self._comm.Barrier()  # every window holds the new parameters before anyone reads it

    def _exchange(self, params: ParameterAccess) -> None:
        x = self._flat(params)
        self._peers.publish(x)
        if self._size == 1:
            return
        if self._weights is None:
            peer = int(self._rng.integers(self._size - 1))
            peer += peer >= self._rank
            mixed = x + self._peers.read(peer, out=self._scratch)
            mixed *= 0.5
        else:
            row = self._weights[self._rank]
            mixed = np.zeros(x.size, np.float64)
            for j in np.flatnonzero(row > 0):
                mixed += row[j] * (x if j == self._rank else self._peers.read(int(j), out=self._scratch))
        params.set_flat(mixed.astype(self._dtype, copy=False))

    def _consensus(self, params: ParameterAccess) -> np.ndarray:
        """The exact average, summed in float64 on rank 0 and broadcast: bit-identical
        everywhere (an ``Allreduce`` does not promise the same bits on every rank). Summed in
        pieces of :data:`CONSENSUS_PIECE` elements, so no float64 copy of the whole model."""
        from mpi4py import MPI

        comm = self._comm
        root = comm.Get_rank() == 0
        local = self._flat(params)
        mean = np.empty_like(local)
        for lo in range(0, local.size, CONSENSUS_PIECE):
            piece = local[lo:lo + CONSENSUS_PIECE].astype(np.float64)
            total = np.empty_like(piece) if root else None
            comm.Reduce(piece, total, op=MPI.SUM, root=0)
            if root:
                mean[lo:lo + piece.size] = total / comm.Get_size()
        comm.Bcast(mean, root=0)
        return mean

    def _close(self) -> None:
        self._peers.close()
        self._peers = None


_RUNNERS: dict[type, type] = {Downpour: DownpourRunner, EASGD: EASGDRunner, Gossip: GossipRunner}


def make_weak_runner(strategy: Strategy) -> WeakRunner:
    """The runner for an asynchronous strategy (``Downpour``, ``EASGD`` or ``Gossip``).

    Local: no communication until the agent calls ``start``.
    """
    for config, runner in _RUNNERS.items():
        if isinstance(strategy, config):
            return runner(strategy)
    raise TypeError(
        f"make_weak_runner takes hva.Downpour(), hva.EASGD() or hva.Gossip(); got {type(strategy).__name__}"
    )
