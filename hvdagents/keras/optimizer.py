"""``hva.keras.DistributedOptimizer``: a Keras 3 optimizer that averages gradients over ranks.

It wraps any Keras 3 optimizer by composition, the way Keras' own ``LossScaleOptimizer``
does: gradients go through one grouped Horovod all-reduce (``horovod.tensorflow``, which
works inside the compiled ``tf.function`` train step), then the inner optimizer applies
them. No class is generated or renamed; the inner optimizer keeps its state.
"""

from __future__ import annotations

from typing import Any

import keras

from ..runtime import horovod_binding

__all__ = ["DistributedOptimizer"]

_COMPRESSIONS = (None, "fp16")


@keras.saving.register_keras_serializable(package="hvdagents")
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Average gradients over all ranks before ``inner_optimizer`` applies them.

    Communication: ``apply`` is collective, since every rank's train step must call it with
    gradients for the same variables in the same order (a grouped all-reduce, averaged).
    ``compression="fp16"`` casts gradients to float16 on the wire. With mixed precision it
    must be the outermost wrapper, ``DistributedOptimizer(LossScaleOptimizer(opt))``, so that
    the loss-scale optimizer decides on the averaged gradients, alike on every rank
    (``KerasAgent`` and :class:`~hvdagents.keras.callbacks.BroadcastGlobalVariablesCallback`
    check this). Use it in
    ``model.compile(optimizer=hva.keras.DistributedOptimizer(opt))`` with TensorFlow as
    the Keras backend, and broadcast the initial state with
    :class:`hvdagents.keras.callbacks.BroadcastGlobalVariablesCallback` (``KerasAgent`` does
    both for you).
    """

    def __init__(self, inner_optimizer: keras.optimizers.Optimizer, compression: str | None = None,
                 name: str | None = None, **kwargs: Any) -> None:
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                f"DistributedOptimizer wraps a Keras 3 optimizer; got {type(inner_optimizer).__name__}"
            )
        if isinstance(inner_optimizer, DistributedOptimizer):
            raise ValueError("DistributedOptimizer: the optimizer is already distributed")
        if compression not in _COMPRESSIONS:
            raise ValueError(f"DistributedOptimizer.compression must be None or 'fp16'; got {compression!r}")
        if kwargs:
            raise ValueError(
                f"DistributedOptimizer does not take {sorted(kwargs)}; set them on the inner optimizer"
            )
        super().__init__(learning_rate=0.0, name=name or "distributed_" + inner_optimizer.name)
        self.inner_optimizer = inner_optimizer
        self.compression = compression
        self._hvd = horovod_binding("tensorflow")

    def build(self, var_list: list) -> None:
        if self.built:
            return
        if not self.inner_optimizer.built:  # a built inner optimizer keeps its variables
            self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Collective: all-reduce (average) ``grads`` over ranks, then apply them."""
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        self.inner_optimizer.apply(self._average(list(grads)), trainable_variables)

    def _average(self, grads: list) -> list:
        import tensorflow as tf

        hvd = self._hvd
        if hvd.size() == 1:
            return grads
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        compression = hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none
        reduced = hvd.grouped_allreduce(dense, op=hvd.Average, compression=compression,
                                        name="hvdagents.grads")
        out = list(grads)
        for i, g in zip(present, reduced):
            out[i] = g
        return out

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        """The inner optimizer's loss scaling (a ``LossScaleOptimizer`` multiplies by its
        dynamic scale; it divides the averaged gradients by the same scale in ``apply``)."""
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "compression": self.compression,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> DistributedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
