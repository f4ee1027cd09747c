"""Keras 3 adapter (TensorFlow backend): ``hva.KerasAgent``, and the TensorFlow collectives
the ``hva.keras`` callbacks share.

Horovod's own ``horovod.keras`` is broken under Keras 3; this adapter is built on
``horovod.tensorflow`` primitives only (grouped all-reduce, broadcast), which work in eager
mode and inside Keras' compiled ``tf.function`` train step.
"""

from __future__ import annotations

import io
import os
import re
from typing import IO, Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..agent import ROOT_RANK, Agent, ParameterSignature, check_same_model
from ..checkpoint import check_archive, check_header, framework_of, header, read_arrays, write_arrays, wrong_framework
from ..collectives import Problem, bcast_array
from ..errors import UsageError
from ..keras.collectives import broadcast_variables
from ..keras.optimizer import distributed_outermost
from ..strategies.config import Strategy, Sync, ZeRO
from ..strategies.sharded import checkpoint_strategy

__all__ = ["KerasAgent"]


#: Keras' automatic suffix of a repeated name: ``dense_3`` in ``sequential_1/dense_3/kernel``.
_AUTO_NUMBER = re.compile(r"_\d+(?=/|$)")
_ANY_NUMBER = re.compile(r"_\d+")


class _KeepWrapper:
    """What :meth:`KerasAgent.average_gradients` returns: closing keeps the distributed
    optimizer in the model (a closed agent's model still trains, averaged, if fit again)."""

    def __init__(self, model: keras.Model | None = None) -> None:
        self._model = model

    def close(self) -> None:
        return None

    def rebind(self) -> None:
        """Local: Horovod was restarted on a new world (an elastic reset): the compiled train
        step is traced again (it read the world's size when traced; Horovod's average reads
        it at run time under an elastic launch)."""
        if self._model is not None and self._model.train_function is not None:
            self._model.make_train_function(force=True)


def _argument_problem(model: Any) -> Problem:
    """What is wrong with KerasAgent's model on this rank (``None``: nothing). Local."""
    if not isinstance(model, keras.Model):
        return TypeError, f"model must be a keras.Model; got {type(model).__name__}"
    if getattr(model, "optimizer", None) is None:
        return UsageError, "KerasAgent needs a compiled model: call model.compile(optimizer=..., loss=...) first"
    if not model.built:
        return UsageError, "KerasAgent needs a built model: give it an input shape (keras.Input) or call model.build()"
    return None


class KerasAgent(Agent):
    """Make a compiled Keras 3 model a distributed agent. Collective constructor.

    Every rank builds and compiles the same model, then makes the agent at the same point.
    The agent checks the models agree (else :class:`~hvdagents.ModelMismatchError` on every
    rank), wraps the optimizer in :class:`hvdagents.keras.DistributedOptimizer` for
    :class:`~hvdagents.Sync`, broadcasts rank 0's weights and optimizer variables, and turns
    XLA off (Horovod ops are not XLA ops). :meth:`fit` is ``model.fit`` on this rank's shard
    with the right callbacks added (metric averaging first, the strategy's exchange after
    every batch) and progress output on rank 0 only.

    :class:`~hvdagents.ZeRO` (sharded ``Sync``, see :mod:`.keras_sharded`): ``model.optimizer``
    becomes a wrapper whose inner optimizer (the user's class and settings) holds the state of
    this rank's range only; the user's optimizer is left unbuilt, and :meth:`save_checkpoint`
    is collective.
    """

    #: ZeRO's wrapper (made by ZeRO's runner at start).
    _sharded: Any = None

    def __init__(self, model: keras.Model, strategy: Strategy | None = None) -> None:
        super().__init__(strategy, "tensorflow", _argument_problem(model))  # raised on every rank
        self.model = model
        variables = model.trainable_variables
        wide = {np.dtype(v.dtype).itemsize > 4 for v in variables}
        self._dtype = np.dtype(np.float64 if True in wide else np.float32)
        if not self._elastic:  # elastic: at the state's sync, where a joining worker meets the others
            check_same_model(self._allgather_object(self._signature(), name="hvdagents.signature"))
        model.jit_compile = False
        if model.train_function is not None:
            model.make_train_function(force=True)
        if not model.optimizer.built and not isinstance(self.strategy, ZeRO):  # ZeRO builds ranges only
            model.optimizer.build(variables)
        if not self._elastic:
            self._broadcast_state()
        self._start_strategy()

    def _broadcast_state(self, root: int = ROOT_RANK) -> None:
        """Collective: ``root``'s weights and optimizer variables on every rank, one by one
        (Horovod broadcasts for synchronous strategies, MPI in pieces otherwise: no size
        limit)."""
        variables = list(self.model.weights) + list(self.model.optimizer.variables)
        if self._sharded is not None:  # ZeRO: the optimizer's state goes out in ranges instead
            broadcast_variables(list(self.model.weights), root_rank=root)
            self._sharded.load_state(root)
            return
        if self._hvd is not None:
            broadcast_variables(variables, root_rank=root)
            return
        if self.context.size == 1:
            return
        for v in variables:
            value = np.array(v.numpy(), order="C")  # a writable copy; keeps 0-d shapes
            bcast_array(self.context.comm, value, root=root)
            if self.context.rank != root:
                v.assign(value)

    def average_gradients(self, strategy: Sync) -> _KeepWrapper:
        """Wrap the model's optimizer in :class:`~hvdagents.keras.DistributedOptimizer` (the
        hand-over Keras' compile() makes for ``LossScaleOptimizer``), outermost, so every
        train step averages the gradients. Called by Sync's runner once the state was
        broadcast; the inner optimizer, already built, keeps its variables."""
        if strategy.backward_passes_per_step != 1:
            raise ValueError(
                "Sync.backward_passes_per_step must be 1 with KerasAgent; for gradient accumulation set "
                f"gradient_accumulation_steps on the Keras optimizer; got {strategy.backward_passes_per_step}"
            )
        if strategy.nonfinite != "pass":
            raise ValueError(
                f"Sync.nonfinite={strategy.nonfinite!r} is checked by TorchAgent only; with KerasAgent use "
                "keras.callbacks.TerminateOnNaN(), or LossScaleOptimizer to skip such steps"
            )
        self.model.optimizer = distributed_outermost(self.model.optimizer, strategy.compression)
        self.model.optimizer.build(self.model.trainable_variables)
        if self.model.train_function is not None:
            self.model.make_train_function(force=True)
        return _KeepWrapper(self.model)

    def shard_optimizer(self, strategy: ZeRO) -> Any:
        """Collective from then on: ``model.optimizer`` becomes ZeRO's wrapper (see
        :mod:`.keras_sharded`), which reduces, applies this rank's range and all-gathers in
        every train step. Refuses, on every rank alike, an optimizer that cannot be cut into
        ranges. Called by ZeRO's runner once the state was broadcast."""
        from .keras_sharded import ShardedOptimizer

        comm = self.context.comm if self.context.mpi_world else None
        user = self.model.optimizer
        sharded = ShardedOptimizer(user, hvd=self._hvd, stage=strategy.stage, comm=comm)
        sharded.partition(list(self.model.trainable_variables), user)
        self.model.optimizer = self._sharded = sharded
        if self.model.train_function is not None:
            self.model.make_train_function(force=True)
        return _KeepWrapper()

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer variables this rank holds (under ``ZeRO``, its ranges' and
        the values kept whole). Local."""
        return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self.model.optimizer.variables))

    # -- training -------------------------------------------------------------------------
    def callbacks(self) -> list[keras.callbacks.Callback]:
        """The callbacks :meth:`fit` adds, in order: metric averaging (strategies that
        communicate through Horovod only: asynchronous agents do not wait for each other, so
        each reports its own), then the strategy's step: after every batch where the runner
        acts after a step, else counted from the optimizer's iterations (no batch hook keeps
        Keras' asynchronous callback dispatch)."""
        from ..keras.callbacks import MetricAverageCallback, StepCounter, StrategyCallback

        averaging = [MetricAverageCallback()] if self._runner.uses_horovod else []
        return [*averaging, (StrategyCallback if self._runner.acts_after_step else StepCounter)(self)]

    def fit(self, x: Any = None, y: Any = None, *, callbacks: Sequence[Any] = (), verbose: Any = "auto",
            checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> keras.callbacks.History:
        """``model.fit`` on this rank's data (``x``, ``y``: this rank's shard, see ``hva.shard``).

        Collective with ``Sync``/``LocalSGD``: every rank runs the same number of batches.
        Uneven shards (``hva.shard`` gives the first ``n % size`` ranks one item more) are
        evened out first, as PyTorch's ``DistributedSampler`` does: the ranks agree on the
        longest shard (one all-gather), and each shorter shard is lengthened to it by repeating
        its own items from the first (``x``, ``y`` and ``sample_weight`` alike). Every step then
        averages the ranks' mean gradients with equal weight, over the same number of batches
        on every rank; a few items of the shorter shards are seen twice per epoch. Data whose
        length cannot be read (a ``tf.data.Dataset``, a generator) must give every rank the
        same number of batches: pass ``steps_per_epoch``, or an error names the fix.

        ``checkpoint``: rank 0 writes an atomic checkpoint there after every epoch (resume
        with :meth:`load_checkpoint` and ``initial_epoch``). Other keyword arguments go to
        ``model.fit`` unchanged; only rank 0 prints progress."""
        self._check_open()
        from ..keras.callbacks import AgentCheckpointCallback

        if self._runner.uses_horovod and self.context.size > 1:  # collective steps: even shards
            x, y, kwargs = self._even_out(x, y, kwargs)
        added = self.callbacks()
        if checkpoint is not None:
            added.append(AgentCheckpointCallback(self, checkpoint))
        return self.model.fit(
            x, y, callbacks=[*added, *callbacks], verbose=verbose if self.context.is_root else 0, **kwargs
        )

    def train_on_batch(self, x: Any, y: Any = None, **kwargs: Any) -> Any:
        """One step of a custom loop: ``model.train_on_batch(x, y, **kwargs)`` on this rank's
        batch, then the strategy's step (``LocalSGD``'s periodic average, the step counters
        that checkpoints and :mod:`hvdagents.elastic` keep). Returns what Keras returns.

        Collective with ``Sync`` (the train step averages the gradients: every rank calls it
        the same number of times) and, every ``period`` calls, with ``LocalSGD``/``DiLoCo``.
        The loop of :func:`hvdagents.elastic.run` with a ``KerasAgent`` is made of these."""
        self._check_open()
        out = self.model.train_on_batch(x, y, **kwargs)
        self._after_local_step()
        return out

    def _even_out(self, x: Any, y: Any, kwargs: dict) -> tuple[Any, Any, dict]:
        """Collective: lengthen a short shard to the longest (see :meth:`fit`)."""
        from ..data import num_items, repeat_to

        n = num_items(x)
        batch = kwargs.get("batch_size", 32 if n is not None else None)
        agreed = self._allgather_object((n, batch, kwargs.get("steps_per_epoch")), name="hvdagents.fit.shape")
        lengths = [a[0] for a in agreed]
        if len({a[1:] for a in agreed}) != 1:
            raise UsageError(
                "KerasAgent.fit: batch_size and steps_per_epoch must be the same on every rank; got "
                f"(batch_size, steps_per_epoch) = {[a[1:] for a in agreed]} by rank"
            )
        if None in lengths:
            if agreed[0][2] is None:
                raise UsageError(
                    "KerasAgent.fit with a synchronous strategy needs the same number of batches on "
                    "every rank, and the length of this data cannot be read: pass x and y as arrays, "
                    "or give steps_per_epoch (the same on every rank) with a dataset that repeats."
                )
            return x, y, kwargs
        longest = max(lengths)
        if n == longest:
            return x, y, kwargs
        kwargs = dict(kwargs)
        if kwargs.get("sample_weight") is not None:
            kwargs["sample_weight"] = repeat_to(kwargs["sample_weight"], longest)
        return repeat_to(x, longest), repeat_to(y, longest), kwargs

    # -- ParameterAccess --------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self.model.trainable_variables))

    def get_flat(self) -> np.ndarray:
        return np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=self._dtype))
                               for v in self.model.trainable_variables])

    def parameter_sizes(self) -> list[tuple[str, int]]:
        return [(v.path, int(np.prod(v.shape))) for v in self.model.trainable_variables]

    def set_flat(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self._dtype)
        if values.shape != (self.num_parameters,):
            raise ValueError(f"expected {self.num_parameters} values; got shape {values.shape}")
        offset = 0
        for v in self.model.trainable_variables:
            n = int(np.prod(v.shape))
            v.assign(values[offset:offset + n].reshape(tuple(v.shape)))
            offset += n

    def average_parameters(self) -> None:
        """Collective: grouped all-reduce (average) of the trainable variables."""
        variables = self.model.trainable_variables
        if self._hvd.size() == 1:
            return
        averaged = self._hvd.grouped_allreduce([tf.convert_to_tensor(v) for v in variables],
                                               op=self._hvd.Average, name="hvdagents.params")
        for v, value in zip(variables, averaged):
            v.assign(value)

    def trainable_mask(self) -> np.ndarray:
        """DiLoCo: every element of :meth:`get_flat` is trained (it holds the trainable
        variables only). Local."""
        return np.ones(self.num_parameters, dtype=bool)

    def start_sum(self, values: np.ndarray, wire: str, name: str) -> Callable[[], np.ndarray]:
        """DiLoCo: collective, blocking. Horovod's TensorFlow all-reduce (sum) of the host
        vector ``values`` in dtype ``wire``, done now (Horovod's TensorFlow ops give no handle
        to wait on later; run from a second thread it raced the metric averaging at an epoch's
        end on 2 ranks); returns a function that returns the sum in float64."""
        total = self._hvd.allreduce(tf.constant(np.asarray(values, dtype=np.dtype(wire))), op=self._hvd.Sum,
                                    name=name).numpy().astype(np.float64)
        return lambda: total

    # -- checkpoints ------------------------------------------------------------------------
    def _signature(self) -> list[ParameterSignature]:
        """Each weight's path, shape and dtype, with Keras' automatic numbering taken out of the
        path (``dense_3/kernel`` -> ``dense/kernel``): a rank that built another model first
        numbers its layers on, and that is no reason to refuse the same architecture."""
        return [(_AUTO_NUMBER.sub("", v.path), tuple(int(d) for d in v.shape), str(v.dtype))
                for v in self.model.weights]

    def _state_arrays(self) -> list[np.ndarray]:
        return [np.asarray(v.numpy()) for v in self.model.non_trainable_weights]

    def _set_state_arrays(self, arrays: list[np.ndarray]) -> None:
        for v, value in zip(self.model.non_trainable_weights, arrays):
            v.assign(value)

    def _framework_state(self) -> Any:
        return {
            "weights": [np.asarray(v.numpy()) for v in self.model.weights],
            "optimizer": [np.asarray(v.numpy()) for v in self.model.optimizer.variables],
        }

    def _gather_framework_state(self) -> Any:
        if self._sharded is None:
            return super()._gather_framework_state()
        optimizer = self._sharded.gather_state(ROOT_RANK)  # collective: every rank sends its ranges
        return {"weights": [np.asarray(v.numpy()) for v in self.model.weights],
                "optimizer": optimizer} if self.context.is_root else None

    def _restore_framework_state(self, state: Any) -> None:
        for v, value in zip(self.model.weights, state["weights"]):
            v.assign(value)
        if self._sharded is not None:  # handed out in ranges by _broadcast_state
            self._sharded.hold(state["optimizer"])
            return
        for v, value in zip(self.model.optimizer.variables, state["optimizer"]):
            v.assign(value)

    def _optimizer_variables(self) -> list[list[Any]]:
        """Path (every ``_N`` taken out: Keras numbers optimizer variables after the layers'
        automatic names), shape and dtype of each optimizer variable (under ``ZeRO``, of the
        whole state, as ``Sync`` holds it)."""
        if self._sharded is not None:
            return [[_ANY_NUMBER.sub("", path), shape, dtype] for path, shape, dtype in self._sharded.signature()]
        return [[_ANY_NUMBER.sub("", v.path), [int(d) for d in v.shape], str(v.dtype)]
                for v in self.model.optimizer.variables]

    def _checkpoint_header(self) -> dict:
        user = self.model.optimizer  # the user's optimizer, inside DistributedOptimizer / LossScaleOptimizer
        while getattr(user, "inner_optimizer", None) is not None:
            user = user.inner_optimizer
        return header("keras", self._signature(),
                      {"class": type(user).__name__, "variables": self._optimizer_variables()},
                      checkpoint_strategy(self.strategy))

    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None:
        """No pickle: NumPy ``.npy`` arrays and a JSON manifest in a zip archive (format 1 of
        :mod:`hvdagents.checkpoint`); an ``extra`` value that cannot be stored so is refused,
        by name, before anything is written."""
        meta = {k: payload[k] for k in ("format", "version", "framework", "model", "optimizer", "strategy")}
        meta["strategy_state"] = payload["strategy_state"]
        tree = {"weights": payload["framework_state"]["weights"],
                "optimizer_state": payload["framework_state"]["optimizer"],
                "strategy_shared": payload["strategy_shared"]}
        for key, value in payload["extra"].items():
            write_arrays(io.BytesIO(), {}, {f"save_checkpoint: extra value {key!r}": value})  # refuse by name
        tree["extra"] = payload["extra"]
        write_arrays(handle, meta, tree)

    def _read_payload(self, path: str) -> dict:
        with check_archive(path) as archive:
            found = framework_of(archive)
            if found != "keras":
                raise wrong_framework(path, found, "keras")
            meta, tree = read_arrays(path, archive)
        check_header(path, meta, self._checkpoint_header())
        return {**meta, "framework_state": {"weights": tree["weights"], "optimizer": tree["optimizer_state"]},
                "strategy_shared": tree["strategy_shared"], "extra": tree["extra"]}
