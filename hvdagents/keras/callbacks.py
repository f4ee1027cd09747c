"""Keras 3 callbacks for distributed training with ``model.fit``.

For users who call ``model.fit`` themselves (``KerasAgent.fit`` adds what it needs):

- :class:`BroadcastGlobalVariablesCallback`: rank 0's weights and optimizer state to all;
- :class:`MetricAverageCallback`: epoch metrics averaged over ranks (put it first);
- :class:`LearningRateWarmupCallback`: linear warm-up from lr to lr * size (Goyal et al. 2017);
- :class:`LearningRateScheduleCallback`: a multiplier of the initial lr by epoch;
- :class:`RankZeroCheckpoint`: rank 0 saves the model atomically after every epoch;
- :class:`StrategyCallback`: runs an agent's strategy after every batch (async sharing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import keras

from ..frameworks.keras import average_values, broadcast_variables
from ..runtime import init

__all__ = [
    "BroadcastGlobalVariablesCallback",
    "MetricAverageCallback",
    "LearningRateWarmupCallback",
    "LearningRateScheduleCallback",
    "RankZeroCheckpoint",
    "StrategyCallback",
    "SyncStepCounter",
    "AgentCheckpointCallback",
    "warmup_learning_rate",
    "check_loss_scale_order",
]


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Collective at train begin: every rank takes ``root_rank``'s weights and optimizer
    variables (the optimizer is built first so its slots exist). Needed once per ``fit``
    when ranks initialise differently."""

    def __init__(self, root_rank: int = 0) -> None:
        super().__init__()
        self.root_rank = root_rank

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        check_loss_scale_order(optimizer)
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        broadcast_variables(list(self.model.weights) + list(optimizer.variables), self.root_rank)


class MetricAverageCallback(keras.callbacks.Callback):
    """Collective at epoch end: replaces each numeric value in ``logs`` by its mean over
    ranks, in place, so callbacks after it (History, checkpoints, early stopping) see the
    job's metrics rather than rank 0's shard. Put it first in the callback list."""

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


def warmup_learning_rate(base_lr: float, size: int, warmup_epochs: float, epoch: float) -> float:
    """Goyal et al. (2017) linear warm-up: ``base_lr`` at epoch 0 rising linearly to
    ``base_lr * size`` at ``warmup_epochs`` (``epoch`` may be fractional), then flat."""
    progress = min(max(epoch, 0.0) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    return base_lr * (1.0 + (size - 1) * progress)


class LearningRateWarmupCallback(keras.callbacks.Callback):
    """Set the learning rate at every batch of the first ``warmup_epochs`` epochs to
    :func:`warmup_learning_rate` of the fractional epoch. ``steps_per_epoch`` is taken from
    ``fit``'s params when not given. Local: no communication."""

    def __init__(self, initial_lr: float, warmup_epochs: float = 5, steps_per_epoch: int | None = None,
                 verbose: int = 0) -> None:
        super().__init__()
        if initial_lr <= 0:
            raise ValueError(f"LearningRateWarmupCallback.initial_lr must be > 0; got {initial_lr}")
        if warmup_epochs < 0:
            raise ValueError(f"LearningRateWarmupCallback.warmup_epochs must be >= 0; got {warmup_epochs}")
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = float(warmup_epochs)
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        steps = self.steps_per_epoch or (self.params or {}).get("steps") or 1
        epoch = self._epoch + batch / steps
        if epoch > self.warmup_epochs:
            return
        lr = warmup_learning_rate(self.initial_lr, init().size, self.warmup_epochs, epoch)
        self.model.optimizer.learning_rate = lr

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.verbose and init().is_root and epoch + 1 == int(self.warmup_epochs):
            print(f"\nEpoch {epoch + 1}: finished learning-rate warm-up to "
                  f"{float(self.model.optimizer.learning_rate):g}")


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Learning rate = ``initial_lr * multiplier(epoch)`` for epochs in
    ``[start_epoch, end_epoch)``; ``multiplier`` is a number or a function of the epoch.
    Local: no communication."""

    def __init__(self, initial_lr: float, multiplier: float | Callable[[int], float],
                 start_epoch: int = 0, end_epoch: int | None = None) -> None:
        super().__init__()
        self.initial_lr = float(initial_lr)
        self.multiplier = multiplier if callable(multiplier) else (lambda epoch, m=float(multiplier): m)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return
        self.model.optimizer.learning_rate = self.initial_lr * float(self.multiplier(epoch))


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


class StrategyCallback(keras.callbacks.Callback):
    """Runs ``agent``'s strategy after every training batch (the local step is Keras' own):
    LocalSGD's periodic average, or Downpour/EASGD/Gossip's one-sided exchange through
    host copies of the weights. Collective only for LocalSGD."""

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.agent._after_local_step()


class SyncStepCounter(keras.callbacks.Callback):
    """Counts ``agent``'s optimizer steps under ``Sync`` from the optimizer's iteration
    counter at every epoch's end (before a checkpoint is written) and at the end of ``fit``.
    Sync needs nothing after a step (its all-reduce is inside the optimizer), and a callback
    without batch hooks keeps Keras' asynchronous callback dispatch, so the training loop
    never waits for Python between steps. Local."""

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


class AgentCheckpointCallback(keras.callbacks.Callback):
    """Rank 0 writes ``agent``'s checkpoint (weights, optimizer, strategy state, epoch)
    after every epoch; see :meth:`hvdagents.KerasAgent.save_checkpoint`."""

    def __init__(self, agent: Any, path: str | os.PathLike) -> None:
        super().__init__()
        self.agent = agent
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.agent.save_checkpoint(self.path, epoch=epoch + 1)

