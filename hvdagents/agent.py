"""The agent layer: what every agent does whatever its framework.

An agent owns one model on one rank. It checks that every rank built the same model,
starts from rank 0's state, runs its strategy's runner after each local step, writes
checkpoints on rank 0 only, and ends (``close``) with one consensus model everywhere.
The framework-specific parts (flat views of parameters, broadcasts, the Horovod binding)
live in the adapters under :mod:`hvdagents.frameworks`, which subclass :class:`Agent`.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from types import ModuleType
from typing import IO, Any, Sequence

import numpy as np

from .checkpoint import CheckpointError, write_atomic
from .collectives import Problem, agree, allgather_object_over, bcast_object_over, mean_over_ranks
from .errors import ClosedError, ModelMismatchError, UsageError
from .runtime import Context, agent_closed, agent_opened, horovod_binding, init, pin_gpu
from .strategies.base import Runner, RunnerState
from .strategies.config import Strategy, Sync
from .strategies.registry import make_runner, strategy_names

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


def _agent_difference(made: Sequence[tuple[str, Strategy]]) -> str:
    """Pure: what differs between rank 0's ``(agent class, strategy)`` and the first rank whose
    pair differs, naming the strategy's fields."""
    rank = next(r for r, m in enumerate(made) if m != made[0])
    (kind0, s0), (kind, s) = made[0], made[rank]
    if kind0 != kind or type(s0) is not type(s):
        detail = f"rank 0 makes {kind0}(strategy={s0!r}) but rank {rank} makes {kind}(strategy={s!r})"
    else:
        names = [f.name for f in dataclasses.fields(s0) if getattr(s0, f.name) != getattr(s, f.name)]
        detail = "; ".join(f"{type(s0).__name__}.{name} is {getattr(s0, name)!r} on rank 0 but "
                           f"{getattr(s, name)!r} on rank {rank}" for name in names)
    return (f"every rank must make the same agent with the same strategy settings: {detail}. Build the "
            "strategy from the same values on every rank (not from the rank, a clock or a random draw).")


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
    #: Under an elastic launch the constructor does not broadcast rank 0's state: a worker that
    #: joins later constructs alone. :mod:`hvdagents.elastic`'s ``State.sync`` does, and sets it.
    _elastic = False
    _elastic_synced = False

    def __init__(self, strategy: Strategy | None, framework: str, problem: Problem = None) -> None:
        """``problem``: what the adapter found wrong with its own arguments on this rank.

        Collective: before anything else that communicates, one agreement over MPI (see
        :func:`~hvdagents.collectives.agree`): a bad argument on any rank, or a strategy or
        agent kind that differs between ranks, raises the same error on every rank."""
        self.context: Context = init()
        self.strategy: Strategy = Sync() if strategy is None else strategy
        strategy_problem: Problem = None if isinstance(self.strategy, Strategy) else (
            TypeError, f"strategy must be one of {strategy_names()}; got {type(self.strategy).__name__}")
        if self.context.mpi_world and self.context.size > 1:
            made = (type(self).__name__, self.strategy if problem is None and strategy_problem is None else None)
            agree(self.context.comm, problem or strategy_problem, made, differ=_agent_difference)
        elif strategy_problem is not None:  # alone, or under horovodrun --gloo (no MPI world to agree on first)
            raise strategy_problem[0](strategy_problem[1])
        from .elastic import elastic_launch, elastic_problem

        self._elastic = elastic_launch(os.environ)  # horovodrun --min-np/--max-np: see hvdagents.elastic
        refused = elastic_problem(type(self).__name__, self.strategy) if self._elastic else None
        if refused is not None:  # before the asynchronous strategies' launch check, which names no way out
            raise refused[0](refused[1])
        self._runner: Runner = make_runner(self.strategy)
        if self._runner.uses_horovod:
            self._hvd = horovod_binding(framework)
        else:
            from .strategies.async_runner import mpi_world_comm

            mpi_world_comm()  # refuse a launch without an MPI world before communicating at all
            pin_gpu(framework)
            self._hvd = None
        if problem is not None:  # not agreed on above (alone, or under --gloo): after the launch checks, as before
            raise problem[0](problem[1])

    # -- collectives on Python objects (MPI, of any size; Horovod's without an MPI world) --------
    def _allgather_object(self, obj: Any, name: str) -> list[Any]:
        """Collective: every rank's ``obj``, in rank order."""
        return allgather_object_over(self.context.comm if self.context.mpi_world else None, self._hvd, obj, name)

    def _broadcast_object(self, obj: Any, name: str, root: int = ROOT_RANK) -> Any:
        """Collective: ``root``'s ``obj`` on every rank."""
        return bcast_object_over(self.context.comm if self.context.mpi_world else None, self._hvd, obj, root, name)

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

    # -- the rest of the model's state (buffers, non-trainable weights; adapters) ---------------
    @abstractmethod
    def _state_arrays(self) -> list[np.ndarray]:
        """Host copies of the model's state beside the shared trainable parameters (buffers
        such as BatchNorm statistics, frozen parameters, non-trainable weights), in an order
        that is the same on every rank."""

    @abstractmethod
    def _set_state_arrays(self, arrays: list[np.ndarray]) -> None:
        """Load arrays shaped as :meth:`_state_arrays` returned into the model (casting back)."""

    def _wait_for_every_rank_to_close(self) -> None:
        """Collective over all ranks, first step of :meth:`close`: a rank that ran out of data
        waits here for the others (adapters that support uneven data override it)."""

    def _adopt_state_of_rank_with_most_steps(self) -> None:
        """Collective, after :meth:`_wait_for_every_rank_to_close`: when the ranks made different numbers of steps
        (uneven data), every rank takes the model, optimizer and strategy state of the rank
        that made the most (the lowest such rank): it took part in every step, the others
        stopped updating when they ran out of data. Nothing moves when the counts agree."""
        steps = self._allgather_object(self._runner.state.step, name="hvdagents.close.steps")
        if len(set(steps)) == 1:
            return
        longest = steps.index(max(steps))
        self._broadcast_state(root=longest)
        state = self._broadcast_object(self._runner.state.to_dict(), name="hvdagents.close.runner", root=longest)
        self._runner.state = RunnerState.from_dict(state)

    def _agree_on_state(self) -> None:
        """Collective: make the state beside the parameters bit-identical on every rank.

        Floating-point arrays become their mean over the ranks (summed in float64 on rank 0,
        then broadcast, so every rank holds the same bits); other arrays (counters such as
        ``num_batches_tracked``) take rank 0's values."""
        arrays = self._state_arrays()
        if self.context.size == 1 or not arrays:
            return
        floats = [a for a in arrays if a.dtype.kind == "f"]
        exact = [a for a in arrays if a.dtype.kind != "f"]
        if self.context.mpi_world:
            comm = self.context.comm
            local = np.concatenate([a.astype(np.float64).ravel() for a in floats] or [np.zeros(0)])
            mean = mean_over_ranks(comm, local, np.empty_like(local), root=ROOT_RANK)
            exact = comm.bcast(exact if self.context.is_root else None, root=ROOT_RANK)
        else:  # no MPI world (horovodrun --gloo): every rank averages the same gathered arrays
            gathered = self._allgather_object(floats, name="hvdagents.state.mean")
            mean = np.concatenate([sum(a.astype(np.float64) for a in column).ravel() / len(gathered)
                                   for column in zip(*gathered)] or [np.zeros(0)])
            exact = self._broadcast_object(exact, name="hvdagents.state.root")
        agreed: list[np.ndarray] = []
        offset, rest = 0, iter(exact)
        for a in arrays:
            if a.dtype.kind == "f":
                agreed.append(mean[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
                offset += a.size
            else:
                agreed.append(next(rest))
        self._set_state_arrays(agreed)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def runner_state(self) -> RunnerState:
        """The strategy's running state (step counters); saved in checkpoints."""
        return self._runner.state

    def _start_strategy(self) -> None:
        """Collective, last step of a constructor: start the strategy; from then on the agent
        is open, and a rank that exits without :meth:`close` ends the job (see
        :func:`hvdagents.runtime.agent_opened`)."""
        self._runner.start(self)
        agent_opened(self, f"{type(self).__name__}({type(self.strategy).__name__})")

    def _after_local_step(self) -> None:
        if self._elastic and not self._elastic_synced:
            raise UsageError(
                "under an elastic launch (horovodrun --min-np/--max-np) the agent starts from rank 0's "
                "state when training enters hva.elastic.run: train inside it, "
                "hva.elastic.run(train)(hva.elastic.State(agent, ...)), not before"
            )
        self._runner.after_step(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    # -- checkpoints -------------------------------------------------------------------------
    @abstractmethod
    def _framework_state(self) -> Any:
        """Host copies of the model's and optimizer's state (what :meth:`_write_payload` stores)."""

    def _gather_framework_state(self) -> Any:
        """Called by :meth:`save_checkpoint` on every rank: what rank 0 stores, ``None`` on the
        others. By default rank 0's own :meth:`_framework_state`, without communication; an
        adapter whose state is spread over the ranks (``ZeRO``) gathers it here, collectively."""
        return self._framework_state() if self.context.is_root else None

    @abstractmethod
    def _restore_framework_state(self, state: Any) -> None:
        """Load what :meth:`_framework_state` returned into the model and optimizer."""

    @abstractmethod
    def _checkpoint_header(self) -> dict:
        """What a checkpoint of this agent is for (:func:`hvdagents.checkpoint.header`)."""

    @abstractmethod
    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None:
        """Write ``payload`` without pickling anything that loading would have to trust;
        raise :class:`~hvdagents.checkpoint.CheckpointError` naming the ``extra`` key that
        cannot be stored so, before writing."""

    @abstractmethod
    def _read_payload(self, path: str) -> dict:
        """Read and check what :meth:`_write_payload` wrote (CRC, no code run, header); raise
        :class:`~hvdagents.checkpoint.CheckpointError` naming the file and the fault."""

    def save_checkpoint(self, path: str | os.PathLike, **extra: Any) -> None:
        """Rank 0 writes model, optimizer, strategy state and ``extra`` (e.g. ``epoch=3``)
        atomically and durably: a temporary file, fsync, a rename, fsync of the directory (a
        crash at any point leaves the previous checkpoint or this one, whole). Other ranks
        return at once; not collective. With an asynchronous strategy rank 0 saves its own
        model and, for Downpour, EASGD and AsyncDiLoCo (flat or ``hierarchical``), the centre
        (pulled one-sidedly; AsyncDiLoCo: every rank's outer momentum buffer too, read from
        its window), which :meth:`load_checkpoint` puts back; ``close()`` first for the
        consensus.

        ``extra`` values must load without running code: None, bool, int, float, str, lists,
        tuples and dicts of them, and tensors (``TorchAgent``: what ``torch.load(...,
        weights_only=True)`` accepts, classes registered with
        ``torch.serialization.add_safe_globals`` included) or NumPy arrays of numbers
        (``KerasAgent``). Another value raises :class:`~hvdagents.checkpoint.CheckpointError`
        naming its key, and nothing is written.

        Under :class:`~hvdagents.ZeRO` it is collective: every rank must call it, since the
        optimizer's state is gathered to rank 0 one parameter at a time (the file is the same
        whole checkpoint as ``Sync``'s)."""
        self._check_open()
        framework_state = self._gather_framework_state()
        if not self.context.is_root:
            return
        payload = {
            **self._checkpoint_header(),
            "framework_state": framework_state,
            "strategy_state": self.runner_state.to_dict(),
            "strategy_shared": self._runner.snapshot(),  # the centre, pulled one-sidedly
            "extra": extra,
        }
        write_atomic(path, lambda handle: self._write_payload(payload, handle))

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Collective: rank 0 reads ``path`` and every rank resumes from it (model,
        optimizer, strategy state); returns the ``extra`` values saved with it.

        Rank 0 checks the file before any rank changes anything: every CRC-32 (truncated or
        corrupted files), nothing unpickled that could run code, and the same framework,
        checkpoint format version, parameters (names, shapes, dtypes), optimizer and
        strategy as this agent. A refused file raises
        :class:`~hvdagents.checkpoint.CheckpointError` on every rank, naming the file and
        what differs, with every rank's model and optimizer as they were; a missing file
        raises ``FileNotFoundError`` on every rank."""
        self._check_open()
        payload: Any = None
        error = None
        if self.context.rank == ROOT_RANK:
            name = os.fspath(path)
            try:
                payload = self._read_payload(name)
                shared = payload.get("strategy_shared")
                expected = self._runner.snapshot_shape(self.num_parameters)
                if shared is not None and np.shape(shared) != expected:
                    raise CheckpointError(
                        f"checkpoint {name!r} holds a centre of shape {np.shape(shared)} for "
                        f"{self.num_parameters} parameters (expected {expected}); it was not loaded"
                    )
            except FileNotFoundError as err:
                error = ("missing", f"cannot read checkpoint {name!r}: {err.strerror or err}")
            except CheckpointError as err:
                error = ("refused", str(err))
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = ("refused", f"cannot read checkpoint {name!r}: {type(err).__name__}: {err}")
            if error is None:
                try:
                    self._restore_framework_state(payload["framework_state"])
                except Exception as err:  # noqa: BLE001 - checked above: not expected
                    error = ("refused", f"loading checkpoint {name!r} into rank 0's model failed, after the "
                                        f"checks passed (rank 0's model may be partly loaded): "
                                        f"{type(err).__name__}: {err}")
        error = self._broadcast_object(error, name="hvdagents.ckpt.error")
        if error:
            raise (FileNotFoundError if error[0] == "missing" else CheckpointError)(error[1])
        shared = None
        if self.context.rank == ROOT_RANK:
            rest = {"strategy_state": payload["strategy_state"], "extra": payload["extra"]}
            shared = payload.get("strategy_shared")  # read by rank 0 only (the centre's init)
            del payload  # the model holds the state now: do not keep a second copy
        else:
            rest = None
        self._broadcast_state()  # tensor by tensor: checkpoints of any size
        rest = self._broadcast_object(rest, name="hvdagents.ckpt")
        self._runner.state = RunnerState.from_dict(rest["strategy_state"])
        self._runner.restore(self, shared)
        return dict(rest["extra"])

    @abstractmethod
    def _broadcast_state(self, root: int = ROOT_RANK) -> None:
        """Collective: ``root``'s model and optimizer state on every rank (adapters)."""

    def flat_parameters(self) -> np.ndarray:
        """A NumPy copy of this rank's model parameters, in the model's dtype. Local; also
        after :meth:`close`, when every rank holds the consensus model."""
        return self.get_flat()

    def close(self) -> None:
        """Collective: end training with one consensus model on every rank.

        Sync: parameters are already identical. LocalSGD: a last average. Downpour/EASGD:
        every rank pulls the centre. Gossip: an exact average. Then the rest of the model's
        state (buffers such as BatchNorm statistics, non-trainable weights) is made identical:
        floating-point values averaged over the ranks, counters taken from rank 0. Windows are
        freed. Every rank must call it; calling it again does nothing. A rank that calls it
        while others still train waits for them (see the adapter for uneven data).
        """
        if self._closed:
            return
        self._runner.settle(self)
        self._wait_for_every_rank_to_close()
        if self._runner.uses_horovod and self.context.size > 1:
            self._adopt_state_of_rank_with_most_steps()
        self._runner.finish(self)
        self._agree_on_state()
        self._closed = True
        agent_closed(self)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        # On an exception, skip the collective close: the other ranks may be elsewhere, and
        # the abort hook ends the whole job once the exception leaves the script.
        if exc_type is None:
            self.close()
