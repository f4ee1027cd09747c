"""Horovod's LearningRateScheduleCallback, batch by batch, against Horovod's formula
(horovod/_keras/callbacks.py), in one process: the callback only reads fit's parameters and
sets the optimizer's rate, it does not communicate."""

import keras
import pytest

from hvdagents.keras.callbacks import LearningRateScheduleCallback


def _model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def _rate(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def _walk(callback, model, epochs, steps):
    """The rate in force during each (epoch, batch), as fit would drive the callback."""
    callback.set_model(model)
    callback.set_params({"epochs": epochs, "steps": steps, "verbose": 0})
    callback.on_train_begin()
    seen, logged = {}, {}
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        for batch in range(steps):
            callback.on_train_batch_begin(batch)
            seen[(epoch, batch)] = _rate(model)
            callback.on_train_batch_end(batch)
        logs = {}
        callback.on_epoch_end(epoch, logs)
        logged[epoch] = logs["lr"]
    return seen, logged


def test_a_number_multiplier_is_exponential_and_staircase_sets_it_once_per_epoch():
    model = _model()
    seen, logged = _walk(LearningRateScheduleCallback(0.1, 0.5, start_epoch=1, end_epoch=3), model, 5, 4)
    for (epoch, _batch), rate in seen.items():
        if epoch == 0:
            assert rate == pytest.approx(0.5)  # before start_epoch: the optimizer's own rate
        elif epoch < 3:
            assert rate == pytest.approx(0.1 * 0.5 ** (epoch - 1))  # initial_lr * m ** (epoch - start)
        else:
            assert rate == pytest.approx(0.1 * 0.5)  # end_epoch is exclusive; the rate is left as it was
    assert logged[2] == pytest.approx(0.05)


def test_without_staircase_the_rate_follows_the_fractional_epoch():
    model = _model()
    callback = LearningRateScheduleCallback(1.0, lambda epoch: 1.0 / (1.0 + epoch), staircase=False)
    seen, _ = _walk(callback, model, 2, 4)
    for (epoch, batch), rate in seen.items():
        assert rate == pytest.approx(1.0 / (1.0 + epoch + batch / 4))  # steps_per_epoch from fit


def test_initial_lr_is_required_and_unknown_steps_are_refused():
    with pytest.raises(ValueError, match="Parameter `initial_lr` is required"):
        LearningRateScheduleCallback(None, 0.5)
    callback = LearningRateScheduleCallback(1.0, 0.5, staircase=False)
    callback.set_model(_model())
    callback.set_params({"epochs": 1, "steps": None, "verbose": 0})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        callback.on_train_begin()
