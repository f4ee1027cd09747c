"""Keras 3 callbacks for distributed training with ``model.fit``.

For users who call ``model.fit`` themselves (``KerasAgent.fit`` adds what it needs):

- :class:`BroadcastGlobalVariablesCallback`: rank 0's weights and optimizer state to all;
- :class:`MetricAverageCallback`: epoch metrics averaged over ranks (put it first);
- :class:`LearningRateWarmupCallback`: Horovod's warm-up, from ``initial_lr / size`` to the
  scaled ``initial_lr`` (Goyal et al. 2017);
- :class:`LearningRateScheduleCallback`: Horovod's schedule, ``initial_lr * multiplier(epoch)``;
- :class:`RankZeroCheckpoint`: rank 0 saves the model atomically after every epoch;
- :class:`StrategyCallback`: runs an agent's strategy after every batch (async sharing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import keras

from ..runtime import init
from .collectives import average_values, broadcast_variables

__all__ = [
    "BroadcastGlobalVariablesCallback",
    "MetricAverageCallback",
    "LearningRateWarmupCallback",
    "LearningRateScheduleCallback",
    "RankZeroCheckpoint",
    "BestModelCheckpoint",
    "StepCounter",
    "StrategyCallback",
    "AgentCheckpointCallback",
    "warmup_learning_rate",
    "check_loss_scale_order",
]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Collective at train begin: every rank takes ``root_rank``'s weights and optimizer
    variables (the optimizer is built first so its slots exist). Needed once per ``fit``
    when ranks initialise differently. Horovod's arguments: ``device`` is accepted and has
    no effect (TensorFlow places the broadcast); ``local_variables`` (a variable or a list)
    are left out of the broadcast. Horovod broadcasts after the first batch; here it is
    before it where the model is built (the first batch starts from ``root_rank``'s state),
    after it otherwise."""

    def __init__(self, root_rank: int = 0, device: str = "", local_variables: Any = None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self.device = device
        if local_variables is None:
            local_variables = []
        elif isinstance(local_variables, keras.Variable) or hasattr(local_variables, "assign"):
            local_variables = [local_variables]
        if not all(hasattr(v, "assign") for v in local_variables):
            raise ValueError("All local variables must be of tf.Variable type.")
        self.local_variables = list(local_variables)
        self._pending = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        check_loss_scale_order(self.model.optimizer)
        self._pending = True
        if self.model.built and self.model.trainable_variables:
            self._broadcast()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # A model without an input shape (a Sequential built by its first batch) has no
        # variables at train begin: then the broadcast follows the first batch, as in Horovod
        # (its averaged gradient was the same on every rank).
        if self._pending:
            self._broadcast()

    def _broadcast(self) -> None:
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        local = {id(v) for v in self.local_variables}
        shared = [v for v in list(self.model.weights) + list(optimizer.variables) if id(v) not in local]
        broadcast_variables(shared, self.root_rank)
        self._pending = False


class MetricAverageCallback(keras.callbacks.Callback):
    """Collective at epoch end: replaces each numeric value in ``logs`` by its mean over
    ranks, in place, so callbacks after it (History, checkpoints, early stopping) see the
    job's metrics rather than rank 0's shard. Put it first in the callback list.
    ``device`` (Horovod's) is accepted and has no effect."""

    def __init__(self, device: str = "") -> None:
        super().__init__()
        self.device = device

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        numeric = {k: v for k, v in logs.items() if isinstance(v, (int, float)) or hasattr(v, "__float__")}
        logs.update(average_values(numeric))


def check_loss_scale_order(optimizer: Any) -> None:
    """Raise :class:`~hvdagents.UsageError` for ``LossScaleOptimizer(DistributedOptimizer(...))``
    (what ``compile`` builds from a ``DistributedOptimizer`` under a ``mixed_float16``
    policy): its finiteness check runs per rank before our all-reduce, so one rank could skip
    a step the others all-reduce. Local."""
    from ..errors import UsageError
    from .optimizer import DistributedOptimizer

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and isinstance(
        optimizer.inner_optimizer, DistributedOptimizer
    ):
        raise UsageError(
            "the model's optimizer is LossScaleOptimizer(DistributedOptimizer(...)) (compile wraps "
            "the optimizer that way under a mixed_float16 policy): each rank would decide alone "
            "whether to skip a step. Compile with optimizer=hva.keras.DistributedOptimizer("
            "keras.optimizers.LossScaleOptimizer(opt)) and auto_scale_loss=False instead, or use "
            "hva.KerasAgent, which orders them for you."
        )


def warmup_learning_rate(initial_lr: float, size: int, warmup_epochs: float, epoch: int, batch: int,
                         steps_per_epoch: int) -> float:
    """Horovod's warm-up (``horovod/_keras/callbacks.py``): the rate set before ``batch`` of
    ``epoch``, ``initial_lr / size * ((epoch + (batch + 1) / steps_per_epoch) * (size - 1) /
    warmup_epochs + 1)``. ``initial_lr`` is the already scaled rate (e.g. ``0.001 * size``):
    the warm-up climbs from about ``initial_lr / size`` and reaches ``initial_lr`` exactly at
    the last batch of the last warm-up epoch (Goyal et al. 2017)."""
    progress = epoch + (batch + 1) / steps_per_epoch
    return initial_lr / size * (progress * (size - 1) / warmup_epochs + 1)


def _momentum_of(optimizer: Any) -> Any:
    """The optimizer's momentum when it is a variable the compiled step reads (so changing
    it for one batch takes effect); ``None`` otherwise."""
    momentum = getattr(optimizer, "momentum", None)
    return momentum if isinstance(momentum, keras.Variable) else None


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Horovod's ``LearningRateScheduleCallback``, argument by argument: for epochs in
    ``[start_epoch, end_epoch)`` the rate is ``initial_lr * multiplier(epoch)``; a number
    ``m`` as ``multiplier`` means ``m ** (epoch - start_epoch)`` (exponential decay).
    ``staircase=True``: set once, at the first batch of each epoch; ``False``: at every batch
    with the fractional epoch ``epoch + batch / steps_per_epoch`` (``steps_per_epoch`` read
    from ``fit`` when not given; data of unknown length raises ``ValueError`` naming it).
    ``momentum_correction``: for the batch in which the rate changes, momentum is scaled by
    new/old rate and then restored, where the optimizer's momentum is a variable; Keras 3's
    built-in optimizers hold it as a constant of the compiled step, so there it is not
    applied (a warning says so, once). Outside the range the rate is left as it is. At each
    epoch's end ``logs["lr"]`` is the current rate. Local: no communication."""

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float], start_epoch: int = 0,
                 end_epoch: int | None = None, staircase: bool = True, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None) -> None:
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required")
        self.initial_lr = float(initial_lr)
        if callable(multiplier):
            self.multiplier = multiplier
        else:
            self.multiplier = lambda epoch, m=float(multiplier): m ** (epoch - start_epoch)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        self._restore_momentum: float | None = None
        self._warned = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = (self.params or {}).get("steps")
            if not self.steps_per_epoch:
                raise ValueError(
                    "Could not autodetect the number of steps per epoch. Please specify the "
                    f"steps_per_epoch parameter to the {type(self).__name__}() (the data's length is "
                    "unknown to fit: a dataset or generator without steps_per_epoch)."
                )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        epoch = self.current_epoch
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return
        if self.staircase and batch == 0:
            self._adjust(epoch)
        elif not self.staircase:
            self._adjust(epoch + batch / self.steps_per_epoch)

    def _adjust(self, epoch: float) -> None:
        optimizer = self.model.optimizer
        old = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        new = self.initial_lr * float(self.multiplier(epoch))
        optimizer.learning_rate = new
        if not self.momentum_correction or old == 0:
            return
        momentum = _momentum_of(optimizer)
        if momentum is not None:
            self._restore_momentum = float(keras.ops.convert_to_numpy(momentum))
            momentum.assign(self._restore_momentum * new / old)
        elif getattr(optimizer, "momentum", 0) and not self._warned and init().is_root:
            self._warned = True
            print(f"{type(self).__name__}: momentum correction is not applied (Keras 3 compiles the "
                  "optimizer's momentum as a constant of the train step)", flush=True)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._restore_momentum is not None:
            _momentum_of(self.model.optimizer).assign(self._restore_momentum)
            self._restore_momentum = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Horovod's ``LearningRateWarmupCallback``, argument by argument: ``initial_lr`` is the
    already scaled rate (``base_lr * size``), reached from ``initial_lr / size`` over the
    first ``warmup_epochs`` epochs, batch by batch (:func:`warmup_learning_rate`); after
    them the rate is left at ``initial_lr``. ``verbose``: rank 0 says when the warm-up
    ends. Data of unknown length needs ``steps_per_epoch`` (else ``ValueError``). Local."""

    def __init__(self, initial_lr: float, warmup_epochs: float = 5, momentum_correction: bool = True,
                 steps_per_epoch: int | None = None, verbose: int = 0) -> None:
        def multiplier(epoch: float) -> float:
            size = init().size
            epoch += 1.0 / self.steps_per_epoch  # the rate at the end of the batch is round
            return 1.0 / size * (epoch * (size - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and init().is_root:
            rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {rate:g}.", flush=True)


class RankZeroCheckpoint(keras.callbacks.Callback):
    """Rank 0 saves the model after every epoch, atomically: to a temporary file in the
    same directory, then renamed over ``filepath`` (``.keras`` for the whole model,
    ``.weights.h5`` for weights only). ``{epoch}`` in ``filepath`` is filled in. Other ranks
    do nothing; not collective."""

    def __init__(self, filepath: str | os.PathLike) -> None:
        super().__init__()
        self.filepath = os.fspath(filepath)
        if not (self.filepath.endswith(".keras") or self.filepath.endswith(".weights.h5")):
            raise ValueError(f"RankZeroCheckpoint.filepath must end in .keras or .weights.h5; got {self.filepath!r}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not init().is_root:
            return
        target = Path(self.filepath.format(epoch=epoch + 1))
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".weights.h5" if target.name.endswith(".weights.h5") else ".keras"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        try:
            if suffix == ".keras":
                self.model.save(tmp)
            else:
                self.model.save_weights(tmp)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class StepCounter(keras.callbacks.Callback):
    """Feeds ``agent``'s strategy one ``after_step`` per optimizer step, counted from the
    optimizer's iteration counter (so ``steps_per_execution > 1``, where Keras calls batch
    hooks once per execution, still counts every step for ``period`` and ``max_staleness``),
    at each epoch's end (before a checkpoint is written) and at the end of ``fit``. Without
    batch hooks Keras keeps its asynchronous callback dispatch, so the training loop never
    waits for Python between steps: what ``Sync`` needs (its work is inside the optimizer).
    The counter it feeds is the runner's, the one checkpoints save. Local."""

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent
        self._counted = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._counted = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._count()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._count()

    def _count(self) -> None:
        now = int(self.model.optimizer.iterations.numpy())
        for _ in range(now - self._counted):
            self.agent._after_local_step()
        self._counted = now


class StrategyCallback(StepCounter):
    """:class:`StepCounter` after every batch (or execution of ``steps_per_execution``
    batches) too: for strategies that act after a step (LocalSGD's periodic average,
    Downpour/EASGD/Gossip's one-sided exchange). Collective only for LocalSGD."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._count()


class AgentCheckpointCallback(keras.callbacks.Callback):
    """Rank 0 writes ``agent``'s checkpoint (weights, optimizer, strategy state, epoch)
    after every epoch; see :meth:`hvdagents.KerasAgent.save_checkpoint`."""

    def __init__(self, agent: Any, path: str | os.PathLike) -> None:
        super().__init__()
        self.agent = agent
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.agent.save_checkpoint(self.path, epoch=epoch + 1)



class BestModelCheckpoint(keras.callbacks.Callback):
    """Horovod's ``BestModelCheckpoint(monitor, verbose, save_weights_only, mode,
    save_freq)``: rank 0 saves the model whenever ``monitor`` improves (Keras'
    ``ModelCheckpoint`` with ``save_best_only=True``), atomically. Horovod leaves
    ``filepath`` to be set afterwards (``callback.filepath = ...``); here it may also be
    given as a keyword. Only ``save_freq="epoch"``. Put it after
    :class:`MetricAverageCallback`, so every rank compares the job's metric."""

    def __init__(self, monitor: str = "val_loss", verbose: int = 0, save_weights_only: bool = False,
                 mode: str = "auto", save_freq: str = "epoch", *, filepath: str | os.PathLike | None = None) -> None:
        super().__init__()
        if save_freq != "epoch":
            raise ValueError(f"BestModelCheckpoint.save_freq must be 'epoch'; got {save_freq!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"BestModelCheckpoint.mode must be 'auto', 'min' or 'max'; got {mode!r}")
        self.monitor, self.verbose, self.save_weights_only = monitor, verbose, save_weights_only
        self.mode, self.save_freq = mode, save_freq
        self.filepath = None if filepath is None else os.fspath(filepath)
        self.best: float | None = None

    def _better(self, value: float) -> bool:
        larger = self.mode == "max" or (self.mode == "auto" and ("acc" in self.monitor or "auc" in self.monitor))
        return self.best is None or (value > self.best if larger else value < self.best)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.filepath is None:
            raise ValueError("BestModelCheckpoint needs a filepath: set callback.filepath before fit")
        suffix = ".weights.h5" if self.save_weights_only else ".keras"
        if not self.filepath.endswith(suffix):
            raise ValueError(f"BestModelCheckpoint.filepath must end in {suffix}; got {self.filepath!r}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not self._better(float(value)):
            return
        self.best = float(value)
        if init().is_root:
            saver = RankZeroCheckpoint(self.filepath)
            saver.set_model(self.model)
            saver.on_epoch_end(epoch)
            if self.verbose:
                print(f"\nEpoch {epoch + 1}: {self.monitor} improved to {self.best:.5g}, saved {self.filepath}",
                      flush=True)
