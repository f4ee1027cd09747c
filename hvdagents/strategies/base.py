"""The strategy interface: what a runner sees of a model, and what it does after a step.

An agent turns a strategy's settings (:mod:`.config`) into a *runner* with
:func:`~.registry.make_runner`. A runner has three moments, called by the agent on every rank:

- ``start(params)``: collective, once, after rank 0's state was broadcast;
- ``after_step(params)``: after every local optimizer step;
- ``finish(params)``: collective, once; leaves one consensus model on every rank.

Runners see the model only through :class:`ParameterAccess`, which the framework adapters
(:mod:`hvdagents.frameworks`) implement: host (NumPy) copies for the one-sided path, the
framework's own Horovod binding for the all-reduce path, and a gradient reducer (the
adapter's hooks) for ``Sync``. A runner states what it needs of the agent in two class
attributes, so that no agent branches on a strategy's settings: ``uses_horovod`` and
``acts_after_step``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol

import numpy as np

from .config import LocalSGD, Strategy, Sync
from .hierarchy import HierarchicalSum, average_parameters, node_hierarchy

__all__ = ["GradientReducer", "ParameterAccess", "RunnerState", "Runner", "SyncRunner", "LocalSGDRunner"]


class GradientReducer(Protocol):
    """What an adapter returns from :meth:`ParameterAccess.average_gradients`."""

    def close(self) -> None:
        """Stop averaging: remove every hook or wrapper that was added. Local."""

    def rebind(self) -> None:
        """Local: Horovod was restarted (an elastic reset): forget the all-reduces in flight and
        take the new world's size, keeping the all-reduces' names."""


class ParameterAccess(Protocol):
    """A model's parameters as the strategies see them (implemented by each adapter)."""

    @property
    def dtype(self) -> np.dtype:
        """Common dtype of the parameters (float32 or float64)."""

    @property
    def num_parameters(self) -> int:
        """Total number of scalar parameters."""

    def get_flat(self) -> np.ndarray:
        """A host copy of all parameters as one 1-D array (deterministic order)."""

    def set_flat(self, values: np.ndarray) -> None:
        """Overwrite all parameters from a 1-D host array in :meth:`get_flat` order."""

    def parameter_sizes(self) -> list[tuple[str, int]]:
        """Each parameter's name and number of elements, in :meth:`get_flat` order (to name
        the parameter behind a position of the flat vector in errors)."""

    def average_parameters(self) -> None:
        """Collective: replace every parameter by its mean over all ranks (grouped all-reduce)."""

    def average_gradients(self, strategy: Sync) -> GradientReducer:
        """Collective from then on: average the gradients over the ranks before every
        optimizer step, with ``strategy``'s settings, until the returned object is closed."""


@dataclass
class RunnerState:
    """The running state of a strategy: saved by checkpoints, restored on resume."""

    step: int = 0
    last_sync_step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunnerState:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


class Runner(ABC):
    """Applies one strategy to one agent's parameters. One per agent.

    ``uses_horovod``: the agent starts its framework's Horovod binding and the runner's
    collectives go through it (the asynchronous runners use MPI windows alone: Horovod's
    background thread slows one-sided calls). ``acts_after_step``: :meth:`after_step` does
    more than count, so a Keras agent calls it after every batch rather than from the
    optimizer's iteration counter."""

    uses_horovod = True
    acts_after_step = True

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.state = RunnerState()

    def start(self, params: ParameterAccess) -> None:
        """Collective: called once on every rank after the initial broadcast."""

    @abstractmethod
    def after_step(self, params: ParameterAccess) -> None:
        """Called after every local optimizer step; the runner counts steps itself."""

    def rebind(self, params: ParameterAccess) -> None:
        """Local: Horovod was restarted under this runner (an elastic reset, see
        :mod:`hvdagents.elastic`: the world grew or shrank). Forget every operation in flight
        (its handles died with the old Horovod) and remake what is sized by the world; the
        model and :attr:`state` are set afterwards by the elastic state's ``sync``."""

    def snapshot(self) -> Optional[np.ndarray]:
        """One-sided: shared state beside the model that a checkpoint must keep (the centre
        of Downpour/EASGD), or ``None``."""
        return None

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        """The shape :meth:`snapshot` has for a model of ``num_parameters`` (a loaded
        checkpoint's is checked against it). Pure."""
        return (num_parameters,)

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: the model was replaced on every rank (a checkpoint was loaded);
        ``saved`` is rank 0's :meth:`snapshot` from it (read on rank 0 only). ``None``: shared
        state the runner keeps beside the model (an RMA store) starts again from the model.
        This runner keeps none: nothing to do."""

    def settle(self, params: ParameterAccess) -> None:
        """First step of the agent's ``close``, before it waits for the other ranks: finish
        what this runner has in flight (a collective every rank started at the same step,
        so the ranks still training complete it too)."""

    def finish(self, params: ParameterAccess) -> None:
        """Collective: called once on every rank; leaves one consensus model everywhere."""


class SyncRunner(Runner):
    """Gradients are averaged before each step by the adapter's gradient reducer (made at
    :meth:`start`, closed at :meth:`finish`); the parameters therefore never diverge and
    there is nothing to do after a step but count it."""

    strategy: Sync
    acts_after_step = False

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._reducer: Optional[GradientReducer] = None

    def start(self, params: ParameterAccess) -> None:
        self._reducer = params.average_gradients(self.strategy)

    def after_step(self, params: ParameterAccess) -> None:
        self.state.step += 1
        self.state.last_sync_step = self.state.step

    def rebind(self, params: ParameterAccess) -> None:
        """Local: the gradient reducer forgets the all-reduces of the old Horovod and takes the
        new world's size (its all-reduces keep their names, as a joining worker's have)."""
        if self._reducer is not None:
            self._reducer.rebind()

    def finish(self, params: ParameterAccess) -> None:
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None


class LocalSGDRunner(Runner):
    """Local steps; every ``period`` steps a collective parameter average (all ranks must
    make the same number of steps). ``finish`` averages once more.

    With ``node_period`` the ranks of each node also average among themselves at the other
    multiples of it; with ``hierarchical`` the averages over all ranks go through the node
    leaders (:mod:`.hierarchy`). Both build the node's communicators at :meth:`start`."""

    strategy: LocalSGD

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._summer: Any = None  # a hierarchy.HierarchicalSum when the settings need one

    def start(self, params: ParameterAccess) -> None:
        if self.strategy.hierarchical or self.strategy.node_period is not None:
            self._summer = HierarchicalSum(params.start_sum, node_hierarchy(params))  # type: ignore[attr-defined]

    def _average(self, params: ParameterAccess, node_only: bool = False) -> None:
        if node_only or self.strategy.hierarchical:
            average_parameters(params, self._summer, node_only=node_only)
        else:
            params.average_parameters()

    def after_step(self, params: ParameterAccess) -> None:
        self.state.step += 1
        since = self.state.step - self.state.last_sync_step
        if since >= self.strategy.period:
            self._average(params)
            self.state.last_sync_step = self.state.step
        elif self.strategy.node_period is not None and since % self.strategy.node_period == 0:
            self._average(params, node_only=True)

    def finish(self, params: ParameterAccess) -> None:
        if self.state.last_sync_step != self.state.step:
            self._average(params)
            self.state.last_sync_step = self.state.step
        if self._summer is not None:
            self._summer.hierarchy.close()
            self._summer = None
