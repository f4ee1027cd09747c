"""The agent layer: what every agent does whatever its framework.

An agent owns one model on one rank. It checks that every rank built the same model,
starts from rank 0's state, runs its strategy's runner after each local step, writes
checkpoints on rank 0 only, and ends (``close``) with one consensus model everywhere.
The framework-specific parts (flat views of parameters, broadcasts, the Horovod binding)
live in the adapters under :mod:`hvdagents.frameworks`, which subclass :class:`Agent`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from types import ModuleType
from typing import IO, Any, Sequence

import numpy as np

from .checkpoint import write_atomic
from .errors import ClosedError, ModelMismatchError
from .runtime import Context, horovod_binding, init, pin_gpu
from .strategies.base import Runner, RunnerState, make_runner
from .strategies.config import Strategy, Sync

__all__ = ["Agent", "ParameterSignature", "check_same_model"]

#: (name, shape, dtype) of one parameter, as compared across ranks.
ParameterSignature = tuple[str, tuple[int, ...], str]

#: Rank whose state every rank starts from, and the one that writes checkpoints.
ROOT_RANK = 0

#: How many differing ranks an error message lists before "...".
_MAX_RANKS_LISTED = 8


def _describe(sig: ParameterSignature) -> str:
    return f"shape {tuple(sig[1])} {sig[2]}"


def check_same_model(signatures: Sequence[Sequence[ParameterSignature]]) -> None:
    """Raise :class:`ModelMismatchError` unless every rank's parameter list equals rank 0's.

    ``signatures[r]`` is rank r's list of ``(name, shape, dtype)``. Pure: every rank calls it
    on the same all-gathered lists and so raises the same error, naming the first parameter
    that differs and the ranks where it differs.
    """
    reference = [(n, tuple(s), d) for n, s, d in signatures[0]]
    differing: dict[int, list[int]] = {}
    for rank, sigs in enumerate(signatures[1:], start=1):
        sigs = [(n, tuple(s), d) for n, s, d in sigs]
        if sigs == reference:
            continue
        index = next(
            (i for i, (a, b) in enumerate(zip(reference, sigs)) if a != b),
            min(len(reference), len(sigs)),
        )
        differing.setdefault(index, []).append(rank)
    if not differing:
        return
    index = min(differing)
    ranks = differing[index]
    listed = ", ".join(map(str, ranks[:_MAX_RANKS_LISTED])) + (", ..." if len(ranks) > _MAX_RANKS_LISTED else "")
    other = [(n, tuple(s), d) for n, s, d in signatures[ranks[0]]]
    if index >= len(reference):
        detail = f"rank(s) {listed} have extra parameter '{other[index][0]}' that rank 0 lacks"
    elif index >= len(other):
        detail = f"rank 0 has parameter '{reference[index][0]}' that rank(s) {listed} lack"
    elif reference[index][0] != other[index][0]:
        detail = (
            f"parameter {index} is '{reference[index][0]}' on rank 0 but "
            f"'{other[index][0]}' on rank(s) {listed}"
        )
    else:
        detail = (
            f"parameter '{reference[index][0]}' has {_describe(reference[index])} on rank 0 "
            f"but {_describe(other[index])} on rank(s) {listed}"
        )
    raise ModelMismatchError(
        f"the model differs between ranks: {detail}. Every rank must build the same model "
        "(same layers, sizes and dtypes) before creating the agent."
    )


class Agent(ABC):
    """Base of :class:`~hvdagents.TorchAgent` and :class:`~hvdagents.KerasAgent`.

    Subclasses implement the :class:`~hvdagents.strategies.base.ParameterAccess` methods
    (``dtype``, ``num_parameters``, ``get_flat``, ``set_flat``, ``average_parameters``) and
    the framework parts of checkpoints (``_framework_state``, ``_restore_framework_state``,
    ``_write_payload``, ``_read_payload``); this class owns the strategy runner, the
    Horovod binding, checkpoints and lifecycle.

    Synchronous strategies communicate through the framework's Horovod binding (``_hvd``).
    Asynchronous ones never start Horovod (``_hvd`` is ``None``) and use MPI alone: Horovod's
    background thread polls MPI all the time, which slows one-sided operations in the same
    process several-fold (measured in ``bench/``: store push+pull at 2 ranks, 3,330 -> 920
    updates/s).
    """

    _closed = False
    _hvd: ModuleType | None

    def __init__(self, strategy: Strategy | None, framework: str) -> None:
        self.context: Context = init()
        self.strategy: Strategy = Sync() if strategy is None else strategy
        if not isinstance(self.strategy, Strategy):
            raise TypeError(
                "strategy must be one of hva.Sync(), hva.LocalSGD(), hva.Downpour(), hva.EASGD(), "
                f"hva.Gossip(); got {type(self.strategy).__name__}"
            )
        self._runner: Runner = make_runner(self.strategy)
        if self.strategy.synchronous:
            self._hvd = horovod_binding(framework)
        else:
            from .strategies.weak import mpi_world_comm

            mpi_world_comm()  # refuse a launch without an MPI world before communicating at all
            pin_gpu(framework)
            self._hvd = None

    # -- collectives on Python objects (Horovod for sync strategies, else MPI) ------------------
    def _allgather_object(self, obj: Any, name: str) -> list[Any]:
        """Collective: every rank's ``obj``, in rank order."""
        if self._hvd is not None:
            return self._hvd.allgather_object(obj, name=name)
        return self.context.comm.allgather(obj)

    def _broadcast_object(self, obj: Any, name: str) -> Any:
        """Collective: rank 0's ``obj`` on every rank."""
        if self._hvd is not None:
            return self._hvd.broadcast_object(obj, root_rank=ROOT_RANK, name=name)
        return self.context.comm.bcast(obj, root=ROOT_RANK)

    # -- ParameterAccess (implemented by adapters) ------------------------------------------
    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    @property
    @abstractmethod
    def num_parameters(self) -> int: ...

    @abstractmethod
    def get_flat(self) -> np.ndarray: ...

    @abstractmethod
    def set_flat(self, values: np.ndarray) -> None: ...

    @abstractmethod
    def average_parameters(self) -> None: ...

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def runner_state(self) -> RunnerState:
        """The strategy's running state (step counters); saved in checkpoints."""
        return self._runner.state

    def _start_strategy(self) -> None:
        self._runner.start(self)

    def _after_local_step(self) -> None:
        self._runner.after_step(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    # -- checkpoints -------------------------------------------------------------------------
    @abstractmethod
    def _framework_state(self) -> Any:
        """Host copies of the model's and optimizer's state (picklable)."""

    @abstractmethod
    def _restore_framework_state(self, state: Any) -> None:
        """Load what :meth:`_framework_state` returned into the model and optimizer."""

    @abstractmethod
    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None: ...

    @abstractmethod
    def _read_payload(self, handle: IO[bytes]) -> dict: ...

    def save_checkpoint(self, path: str | os.PathLike, **extra: Any) -> None:
        """Rank 0 writes model, optimizer, strategy state and ``extra`` (e.g. ``epoch=3``)
        atomically: a temporary file, then a rename. Other ranks return at once; not collective.
        With an asynchronous strategy rank 0 saves its own model; ``close()`` first for the
        consensus."""
        self._check_open()
        if not self.context.is_root:
            return
        payload = {
            "framework_state": self._framework_state(),
            "strategy_state": self.runner_state.to_dict(),
            "extra": extra,
        }
        write_atomic(path, lambda handle: self._write_payload(payload, handle))

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Collective: rank 0 reads ``path`` and every rank resumes from it (model,
        optimizer, strategy state); returns the ``extra`` values saved with it. A missing or
        unreadable file raises ``FileNotFoundError`` on every rank, naming the file."""
        self._check_open()
        payload: Any = None
        error = None
        if self.context.rank == ROOT_RANK:
            try:
                with open(path, "rb") as handle:
                    payload = self._read_payload(handle)
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = f"cannot read checkpoint {os.fspath(path)!r}: {type(err).__name__}: {err}"
        error = self._broadcast_object(error, name="hvdagents.ckpt.error")
        if error:
            raise FileNotFoundError(error)
        payload = self._broadcast_object(payload, name="hvdagents.ckpt")
        self._restore_framework_state(payload["framework_state"])
        self._runner.state = RunnerState.from_dict(payload["strategy_state"])
        self._runner.reseed(self)
        return dict(payload["extra"])

    def flat_parameters(self) -> np.ndarray:
        """A NumPy copy of this rank's model parameters, in the model's dtype. Local; also
        after :meth:`close`, when every rank holds the consensus model."""
        return self.get_flat()

    def close(self) -> None:
        """Collective: end training with one consensus model on every rank.

        Sync: parameters are already identical. LocalSGD: a last average. Downpour/EASGD:
        every rank pulls the centre. Gossip: an exact average. Windows are freed. Every rank
        must call it; calling it again does nothing.
        """
        if self._closed:
            return
        self._runner.finish(self)
        self._closed = True

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # On an exception, skip the collective close: the other ranks may be elsewhere, and
        # the abort hook ends the whole job once the exception leaves the script.
        if exc_type is None:
            self.close()
