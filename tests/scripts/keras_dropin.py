"""Horovod's DistributedOptimizer arguments through ``import hvdagents.keras as hvd`` under
mpirun -np 2, each against one process on the full batches (float32): the ported script's
arguments, backward_passes_per_step with the sum (Horovod's default) and the mean, op=Sum,
gradient_predivide_factor, fp16 compression. RESULT lines on rank 0."""

import keras
import numpy as np
from _batches import regression_batches
from _report import emit

import hvdagents.keras as hvd

hvd.init()
BATCH, STEPS = 16, 8
X, Y, MINE = regression_batches(STEPS, BATCH, hvd.rank(), hvd.size())
HALF = BATCH // hvd.size()


def make():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def flat(model):
    return np.concatenate([w.ravel() for w in model.get_weights()])


def train(optimizer, distributed):
    model = make()
    model.compile(optimizer=optimizer, loss="mse")
    x, y, batch = (X[MINE], Y[MINE], HALF) if distributed else (X, Y, BATCH)
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0)] if distributed else []
    model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    return flat(model)


def compare(name, ours, reference):
    mine = train(ours, True)
    gathered = hvd.allgather(mine[None, :])
    ref = train(reference, False)
    if hvd.rank() == 0:
        emit({"check": name, "max_abs": float(np.max(np.abs(mine - ref))),
              "moved": float(np.max(np.abs(ref - flat(make())))),
              "identical": bool(np.array_equal(gathered[0], gathered[1]))})


sgd = keras.optimizers.SGD
compare("ported_arguments", hvd.DistributedOptimizer(sgd(0.1), backward_passes_per_step=1,
                                                     average_aggregated_gradients=True), sgd(0.1))
compare("passes_sum", hvd.DistributedOptimizer(sgd(0.1), backward_passes_per_step=2),
        sgd(0.2, gradient_accumulation_steps=2))  # Horovod's default: the sum of the 2 batches
compare("passes_mean", hvd.DistributedOptimizer(sgd(0.1), backward_passes_per_step=2,
                                                average_aggregated_gradients=True),
        sgd(0.1, gradient_accumulation_steps=2))
compare("op_sum", hvd.DistributedOptimizer(sgd(0.1 / hvd.size()), op=hvd.Sum), sgd(0.1))
compare("predivide", hvd.DistributedOptimizer(sgd(0.1), gradient_predivide_factor=2.0), sgd(0.1))
compare("fp16", hvd.DistributedOptimizer(sgd(0.1), compression=hvd.Compression.fp16), sgd(0.1))
# a mutually exclusive pair is refused, naming both
try:
    hvd.DistributedOptimizer(sgd(0.1, gradient_accumulation_steps=3), backward_passes_per_step=2)
    refused = "no error"
except ValueError as err:
    refused = str(err)
if hvd.rank() == 0:
    emit({"check": "conflicting_accumulation", "message": refused})
