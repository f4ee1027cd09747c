"""Keras 3 adapter (TensorFlow backend): ``hva.KerasAgent``, and the TensorFlow collectives
the ``hva.keras`` callbacks share.

Horovod's own ``horovod.keras`` is broken under Keras 3; this adapter is built on
``horovod.tensorflow`` primitives only (grouped all-reduce, broadcast), which work in eager
mode and inside Keras' compiled ``tf.function`` train step.
"""

from __future__ import annotations

import os
import pickle
from typing import IO, Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..agent import ROOT_RANK, Agent, ParameterSignature, check_same_model
from ..errors import UsageError
from ..runtime import horovod_binding
from ..strategies.config import Strategy, Sync

__all__ = ["KerasAgent", "broadcast_variables", "average_values"]


def broadcast_variables(variables: Sequence[Any], root_rank: int = ROOT_RANK) -> None:
    """Collective: assign ``root_rank``'s value of every variable on every rank.

    Variables are broadcast one by one in list order, which must be the same on every rank
    (Keras' ``model.weights`` and ``optimizer.variables`` orders are)."""
    hvd = horovod_binding("tensorflow")
    if hvd.size() == 1:
        return
    for i, v in enumerate(variables):
        v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=root_rank, name=f"hvdagents.bcast.{i}"))


def average_values(values: Mapping[str, float]) -> dict[str, float]:
    """Collective: the mean over ranks of each named scalar (one all-reduce, keys sorted).

    Every rank must pass the same keys."""
    hvd = horovod_binding("tensorflow")
    keys = sorted(values)
    if hvd.size() == 1 or not keys:
        return {k: float(values[k]) for k in keys}
    local = tf.constant([float(values[k]) for k in keys], dtype=tf.float64)
    mean = hvd.allreduce(local, op=hvd.Average, name="hvdagents.metrics").numpy()
    return dict(zip(keys, map(float, mean)))


class KerasAgent(Agent):
    """Make a compiled Keras 3 model a distributed agent. Collective constructor.

    Every rank builds and compiles the same model, then makes the agent at the same point.
    The agent checks the models agree (else :class:`~hvdagents.ModelMismatchError` on every
    rank), wraps the optimizer in :class:`hvdagents.keras.DistributedOptimizer` for
    :class:`~hvdagents.Sync`, broadcasts rank 0's weights and optimizer variables, and turns
    XLA off (Horovod ops are not XLA ops). :meth:`fit` is ``model.fit`` on this rank's shard
    with the right callbacks added (metric averaging first, the strategy's exchange after
    every batch) and progress output on rank 0 only.
    """

    def __init__(self, model: keras.Model, strategy: Strategy | None = None) -> None:
        super().__init__(strategy, "tensorflow")
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model; got {type(model).__name__}")
        if getattr(model, "optimizer", None) is None:
            raise UsageError("KerasAgent needs a compiled model: call model.compile(optimizer=..., loss=...) first")
        if not model.built:
            raise UsageError(
                "KerasAgent needs a built model: give it an input shape (keras.Input) or call model.build()"
            )
        if isinstance(self.strategy, Sync) and self.strategy.backward_passes_per_step != 1:
            raise ValueError(
                "Sync.backward_passes_per_step must be 1 with KerasAgent; for gradient accumulation set "
                f"gradient_accumulation_steps on the Keras optimizer; got {self.strategy.backward_passes_per_step}"
            )
        from ..keras.optimizer import DistributedOptimizer

        self.model = model
        variables = model.trainable_variables
        dtypes = {v.dtype for v in variables}
        if len(dtypes) != 1:
            raise ValueError(f"KerasAgent needs all trainable variables in one dtype; got {sorted(dtypes)}")
        self._dtype = np.dtype(next(iter(dtypes)))
        check_same_model(self._allgather_object(self._signature(), name="hvdagents.signature"))
        if isinstance(self.strategy, Sync) and not isinstance(model.optimizer, DistributedOptimizer):
            # The same hand-over Keras' compile() makes for LossScaleOptimizer.
            model.optimizer = DistributedOptimizer(model.optimizer, compression=self.strategy.compression)
        model.jit_compile = False
        if model.train_function is not None:
            model.make_train_function(force=True)
        if not model.optimizer.built:
            model.optimizer.build(variables)
        self._broadcast_state(list(model.weights) + list(model.optimizer.variables))
        self._start_strategy()

    def _broadcast_state(self, variables: list) -> None:
        """Collective: rank 0's values of ``variables`` on every rank."""
        if self._hvd is not None:
            broadcast_variables(variables)
            return
        values = [np.asarray(v.numpy()) for v in variables] if self.context.is_root else None
        for v, value in zip(variables, self._broadcast_object(values, name="hvdagents.state")):
            v.assign(value)

    # -- training -------------------------------------------------------------------------
    def callbacks(self) -> list[keras.callbacks.Callback]:
        """The callbacks :meth:`fit` adds, in order: metric averaging (synchronous strategies
        only: asynchronous agents do not wait for each other, so each reports its own), then
        the strategy's step."""
        from ..keras.callbacks import MetricAverageCallback, StrategyCallback, SyncStepCounter

        if isinstance(self.strategy, Sync):
            return [MetricAverageCallback(), SyncStepCounter(self)]
        averaging = [MetricAverageCallback()] if self.strategy.synchronous else []
        return [*averaging, StrategyCallback(self)]

    def fit(self, x: Any = None, y: Any = None, *, callbacks: Sequence[Any] = (), verbose: Any = "auto",
            checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> keras.callbacks.History:
        """``model.fit`` on this rank's data (``x``, ``y``: this rank's shard, see ``hva.shard``).

        Collective with ``Sync``/``LocalSGD``: every rank must run the same number of batches.
        ``checkpoint``: rank 0 writes an atomic checkpoint there after every epoch (resume
        with :meth:`load_checkpoint` and ``initial_epoch``). Other keyword arguments go to
        ``model.fit`` unchanged; only rank 0 prints progress."""
        self._check_open()
        from ..keras.callbacks import AgentCheckpointCallback

        added = self.callbacks()
        if checkpoint is not None:
            added.append(AgentCheckpointCallback(self, checkpoint))
        return self.model.fit(
            x, y, callbacks=[*added, *callbacks], verbose=verbose if self.context.is_root else 0, **kwargs
        )

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

    # -- checkpoints ------------------------------------------------------------------------
    def _signature(self) -> list[ParameterSignature]:
        return [(v.path, tuple(int(d) for d in v.shape), str(v.dtype)) for v in self.model.weights]

    def _framework_state(self) -> Any:
        return {
            "weights": [np.asarray(v.numpy()) for v in self.model.weights],
            "optimizer": [np.asarray(v.numpy()) for v in self.model.optimizer.variables],
        }

    def _restore_framework_state(self, state: Any) -> None:
        for v, value in zip(self.model.weights, state["weights"]):
            v.assign(value)
        for v, value in zip(self.model.optimizer.variables, state["optimizer"]):
            v.assign(value)

    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None:
        pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def _read_payload(self, handle: IO[bytes]) -> dict:
        return pickle.load(handle)
