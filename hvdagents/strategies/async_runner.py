"""The runner of the weak (asynchronous) strategies: Downpour, EASGD, Gossip, AsyncDiLoCo.

Agents never wait for each other during training: every ``period`` local steps each one
runs its strategy's :class:`~.exchanges.Exchange` (one-sided window operations), at its own
pace (with ``hierarchical=True``, the ranks of one node exchange together:
:mod:`~.node_centre`). Only :meth:`AsyncRunner.start`, :meth:`~AsyncRunner.restore` and
:meth:`~AsyncRunner.finish` are collective. A staleness bound is a separate wrapper
(:class:`~.staleness.StalenessBound`), added by :func:`~.registry.make_runner`.

All windows are used with shared locks only (one ``Lock_all`` epoch per window), so no two
agents can deadlock on lock order, however their exchanges interleave.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import NonFiniteError, UsageError
from .base import ParameterAccess, Runner
from .config import Strategy
from .exchanges import Exchange
from .windows import SUPPORTED_DTYPES

__all__ = ["AsyncRunner", "mpi_world_comm"]

_NEW, _RUNNING, _FINISHED = "new", "running", "finished"


def mpi_world_comm() -> Any:
    """``COMM_WORLD``, or a LauncherError naming the fix when the launch has no MPI world."""
    from ..runtime import init, no_mpi_world

    ctx = init()
    if not ctx.mpi_world:
        raise no_mpi_world(
            "Asynchronous strategies (Downpour, EASGD, Gossip) share parameters through MPI "
            "one-sided windows",
            "use hva.Sync() / hva.LocalSGD() under Gloo",
        )
    return ctx.comm


class AsyncRunner(Runner):
    """Counts steps and runs ``exchange_type``'s exchange every ``strategy.period`` steps.

    ``start`` and ``finish`` are collective (every rank, once each, in that order);
    ``after_step`` is local to the calling agent apart from one-sided window operations.
    """

    uses_horovod = False

    def __init__(self, strategy: Strategy, exchange_type: type[Exchange]) -> None:
        super().__init__(strategy)
        self._exchange_type = exchange_type
        self._phase = _NEW
        self._comm: Any = None
        self.exchange: Optional[Exchange] = None

    def start(self, params: ParameterAccess) -> None:
        """Collective: create the exchange's windows and start every agent from rank 0's
        parameters.

        Raises :class:`~hvdagents.errors.LauncherError` under ``horovodrun --gloo`` (no MPI
        world), and ``ValueError`` for settings that do not fit the world (a Gossip matrix of
        the wrong size) or parameters of an unsupported dtype, before any window exists.
        """
        if self._phase != _NEW:
            raise UsageError(
                f"start() was called on a {self._phase} {type(self.strategy).__name__} runner; a runner starts "
                "once. Make a new agent (or runner) to train again."
            )
        self._comm = mpi_world_comm()
        self._exchange_type.check_world(self.strategy, self._comm.Get_size())
        dtype = np.dtype(params.dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{type(self.strategy).__name__} shares float32 or float64 parameters through its "
                f"windows; the model's parameters are {dtype}"
            )
        self.exchange = self._exchange_type(self.strategy, int(params.num_parameters), dtype, self._comm)
        self.exchange.seed(params)
        self._phase = _RUNNING

    def after_step(self, params: ParameterAccess) -> None:
        """Count the step; every ``period`` steps run the exchange. Not collective."""
        self._require_running("after_step")
        self.state.step += 1
        if self.state.step - self.state.last_sync_step >= self.strategy.period:
            try:
                self.exchange.exchange(params)
            except NonFiniteError as err:
                err.step = self.state.step  # the exchange does not count steps
                raise
            self.state.last_sync_step = self.state.step

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: the model was replaced on every rank (a checkpoint was loaded); resume
        the shared parameters from ``saved``, rank 0's :meth:`snapshot`, or with ``None``
        restart them (centre or published vectors) from rank 0's model. Before ``start`` it
        does nothing.

        Call it on every rank at the same step count (e.g. a checkpoint loaded before training
        resumes): under a staleness bound a rank ahead would otherwise wait forever for a rank
        that is inside this call."""
        if self._phase == _NEW:
            return
        self._require_running("restore")
        self._comm.Barrier()  # every rank's exchanges against the old parameters are complete
        self.exchange.restore(params, saved)

    def snapshot(self) -> Optional[np.ndarray]:
        """One-sided: the shared state to save beside the model (the centre), or ``None``."""
        return self.exchange.snapshot() if self._phase == _RUNNING else None

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        if self.exchange is None:
            return super().snapshot_shape(num_parameters)
        return self.exchange.snapshot_shape(num_parameters)

    def finish(self, params: ParameterAccess) -> None:
        """Collective: leave one consensus model on every rank and free the windows.

        The exchange settles (its last one-sided work), every agent waits at a barrier (all
        exchanges are then complete), every rank takes the consensus (bit-identical) and the
        windows are freed. Idempotent.
        """
        if self._phase == _FINISHED:
            return
        self._require_running("finish")
        try:
            self.exchange.settle(params)
        except NonFiniteError as err:
            err.step = self.state.step
            raise
        self._comm.Barrier()
        params.set_flat(self.exchange.consensus(params))
        self.state.last_sync_step = self.state.step
        self.exchange.close()
        self._phase = _FINISHED

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
