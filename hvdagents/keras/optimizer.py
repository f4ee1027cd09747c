"""``hva.keras.DistributedOptimizer``: a Keras 3 optimizer that averages gradients over ranks.

It wraps any Keras 3 optimizer by composition, the way Keras' own ``LossScaleOptimizer``
does: gradients go through one grouped Horovod all-reduce (``horovod.tensorflow``, which
works inside the compiled ``tf.function`` train step), then the inner optimizer applies
them. No class is generated or renamed; the inner optimizer keeps its state.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any

import keras

from ..runtime import horovod_binding

__all__ = ["DistributedOptimizer", "distributed_outermost", "DelegatesToInner"]


class DelegatesToInner:
    """Mixin (before ``keras.optimizers.Optimizer``) for an optimizer that wraps
    ``self.inner_optimizer`` by composition, as Keras' ``LossScaleOptimizer`` does: the
    learning rate, the step counter and loss scaling are the inner optimizer's, and its
    variables follow the wrapper's own. Local."""

    inner_optimizer: Any
    _variables: list

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

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

@keras.saving.register_keras_serializable(package="hvdagents")
class DistributedOptimizer(DelegatesToInner, keras.optimizers.Optimizer):
    """Average gradients over all ranks before ``optimizer`` applies them.

    Horovod's ``DistributedOptimizer(optimizer, name, device_dense, device_sparse,
    compression, sparse_as_dense, gradient_predivide_factor, op, backward_passes_per_step,
    average_aggregated_gradients, num_groups, groups, process_set, scale_local_gradients)``,
    argument by argument, for Keras 3 (``import hvdagents.keras as hvd`` is the drop-in).
    Where it differs (README, "Horovod's Keras API"): sparse gradients are always averaged
    dense; ``device_*``, ``num_groups``/``groups`` and ``scale_local_gradients`` are accepted
    and have no effect (one grouped all-reduce, placed by TensorFlow); only the global
    process set exists. ``backward_passes_per_step=k`` accumulates k batches in the inner
    optimizer (Keras' ``gradient_accumulation_steps``, which it sets) and applies their mean
    (``average_aggregated_gradients=True``) or their sum (``False``, Horovod's default); the
    gradients are averaged over the ranks at every batch.

    It wraps by composition, the way Keras' own ``LossScaleOptimizer`` does: the inner
    optimizer keeps its state and class. Communication: ``apply`` is collective, since every
    rank's train step must call it with gradients for the same variables in the same order
    (a grouped all-reduce). With mixed precision it must be the outermost wrapper,
    ``DistributedOptimizer(LossScaleOptimizer(opt))``, so that the loss-scale optimizer
    decides on the averaged gradients, alike on every rank (``KerasAgent`` and
    :class:`~hvdagents.keras.callbacks.BroadcastGlobalVariablesCallback` check this). Horovod
    starts when the first gradients are averaged, not when the optimizer is made (a saved
    model loads without MPI).
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer | None = None, name: str | None = None,
                 device_dense: str = "", device_sparse: str = "", compression: Any = None,
                 sparse_as_dense: bool = False, gradient_predivide_factor: float = 1.0, op: Any = None,
                 backward_passes_per_step: int = 1, average_aggregated_gradients: bool = False,
                 num_groups: int = 0, groups: Any = None, process_set: Any = None,
                 scale_local_gradients: bool = True, *, inner_optimizer: keras.optimizers.Optimizer | None = None,
                 **kwargs: Any) -> None:
        from .dropin import compression_name

        optimizer = optimizer if optimizer is not None else inner_optimizer
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a Keras 3 optimizer; got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("DistributedOptimizer: the optimizer is already distributed")
        if kwargs:
            raise ValueError(
                f"DistributedOptimizer does not take {sorted(kwargs)}; set them on the inner optimizer"
            )
        if op not in (None, "average", "sum") and _op_name(op) is None:
            raise ValueError("op currently only supports Average and Sum")
        if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
                or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1; got {backward_passes_per_step!r}")
        if gradient_predivide_factor <= 0:
            raise ValueError(f"gradient_predivide_factor must be > 0; got {gradient_predivide_factor}")
        if num_groups:
            warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                          DeprecationWarning, stacklevel=2)
        if groups is not None and not isinstance(groups, list) and not (isinstance(groups, int) and groups > 0):
            raise ValueError("groups should be a non-negative integer or a list of list of tf.Variable.")
        if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
            raise ValueError("DistributedOptimizer: only the global process set is supported")
        if backward_passes_per_step > 1:
            steps = optimizer.gradient_accumulation_steps
            if steps not in (None, backward_passes_per_step):
                raise ValueError(
                    f"backward_passes_per_step={backward_passes_per_step} but the optimizer accumulates "
                    f"gradient_accumulation_steps={steps}: give one of them"
                )
            if optimizer.built and steps is None:
                raise ValueError("backward_passes_per_step > 1 needs an optimizer that is not built yet")
            optimizer.gradient_accumulation_steps = backward_passes_per_step
        super().__init__(learning_rate=0.0, name=name or "distributed_" + optimizer.name)
        self.inner_optimizer = optimizer
        self.compression = compression_name(compression)
        self.op = _op_name(op) or "average"
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.backward_passes_per_step = backward_passes_per_step
        self.average_aggregated_gradients = bool(average_aggregated_gradients)
        self.sparse_as_dense = bool(sparse_as_dense)

    def build(self, var_list: list) -> None:
        if self.built:
            return
        if not self.inner_optimizer.built:  # a built inner optimizer keeps its variables
            self.inner_optimizer.build(var_list)
        super().build(var_list)

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Collective: all-reduce (average) ``grads`` over ranks, then apply them."""
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        self.inner_optimizer.apply(self._average(list(grads)), trainable_variables)

    def _average(self, grads: list) -> list:
        import tensorflow as tf

        hvd = horovod_binding("tensorflow")
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = [tf.convert_to_tensor(grads[i]) for i in present]
        # Named by what it reduces (the same on every rank, whatever order the ranks made their
        # optimizers in), so two optimizers (a GAN's) may all-reduce in one train step.
        shapes = ";".join(f"{tuple(g.shape)}{g.dtype.name}" for g in dense)
        name = f"hvdagents.grads.{zlib.crc32(shapes.encode()):08x}"
        # Keras' accumulation applies the mean of the k batches; Horovod's default is the sum
        scale = 1.0 if self.average_aggregated_gradients else float(self.backward_passes_per_step)
        if hvd.size() > 1 and dense:
            compression = hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none
            predivide = self.gradient_predivide_factor if self.op == "average" else 1.0
            dense = hvd.grouped_allreduce(dense, op=hvd.Average if self.op == "average" else hvd.Sum,
                                          compression=compression, name=name,
                                          prescale_factor=1.0 / predivide, postscale_factor=predivide)
        out = list(grads)
        for i, g in zip(present, dense):
            out[i] = g * scale if scale != 1.0 else g
        return out

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "compression": self.compression,
            "op": self.op,
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "backward_passes_per_step": self.backward_passes_per_step,
            "average_aggregated_gradients": self.average_aggregated_gradients,
            "sparse_as_dense": self.sparse_as_dense,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> DistributedOptimizer:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def _op_name(op: Any) -> str | None:
    """``"average"``/``"sum"`` for Horovod's constants or our names; ``None`` otherwise."""
    if op is None or op in ("average", "sum"):
        return op
    import horovod.tensorflow as hvd

    return {hvd.Average: "average", hvd.Sum: "sum"}.get(op)


def distributed_outermost(optimizer: keras.optimizers.Optimizer, compression: str | None) -> Any:
    """``optimizer`` with :class:`hvdagents.keras.DistributedOptimizer` as its outermost wrapper.

    Under a ``mixed_float16`` policy ``compile`` wraps the optimizer in Keras'
    ``LossScaleOptimizer``, which checks locally whether the gradients are finite and skips
    the step when they are not. Inside it, our all-reduce would run on the ranks that did not
    skip only (a hang, or ranks that silently diverge); outside it, the loss-scale optimizer
    sees the averaged gradients, identical on every rank, and every rank decides alike. So a
    ``LossScaleOptimizer(DistributedOptimizer(opt))`` becomes
    ``DistributedOptimizer(LossScaleOptimizer(opt))`` with the same loss-scale settings.
    """
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and isinstance(
        optimizer.inner_optimizer, DistributedOptimizer
    ):
        inner = optimizer.inner_optimizer
        if isinstance(inner.inner_optimizer, keras.optimizers.LossScaleOptimizer):
            return inner  # compile's automatic wrapper around an optimizer already loss-scaled
        optimizer = keras.optimizers.LossScaleOptimizer(
            inner.inner_optimizer, initial_scale=optimizer.initial_scale,
            dynamic_growth_steps=optimizer.dynamic_growth_steps,
        )
        compression = inner.compression
    return DistributedOptimizer(optimizer, compression=compression)
