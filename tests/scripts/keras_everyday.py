"""Everyday Keras under mpirun -np 2 beyond the drop-in: a custom train_step with two
DistributedOptimizers (GAN-style) against one process; steps_per_execution > 1 counted per
optimizer step for LocalSGD's period; a rank whose layers Keras numbered on (it built another
model first) is not refused. RESULT lines on rank 0."""

import keras
import numpy as np
import tensorflow as tf
from _batches import regression_batches
from _report import emit

import hvdagents as hva
import hvdagents.keras as hvd

hvd.init()
BATCH, STEPS = 16, 6
X, Y, MINE = regression_batches(STEPS, BATCH, hvd.rank(), hvd.size())
HALF = BATCH // hvd.size()


class TwoOptimizers(keras.Model):
    """A generator-like head trained on its own loss, then a critic-like head trained on a
    loss that reads the first head's output: two optimizers in one train step."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(3, activation="tanh")
        self.second = keras.layers.Dense(1)
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.first(x)) + self.second(x)

    def compile(self, first_opt, second_opt):
        super().compile()
        self.first_opt, self.second_opt = first_opt, second_opt

    def train_step(self, data):
        x, y = data
        first_vars = self.first.trainable_variables + self.out.trainable_variables
        with tf.GradientTape() as tape:
            loss_a = tf.reduce_mean((self.out(self.first(x)) - y) ** 2)
        self.first_opt.apply(tape.gradient(loss_a, first_vars), first_vars)
        with tf.GradientTape() as tape:
            loss_b = tf.reduce_mean((self(x) - y) ** 2)
        self.second_opt.apply(tape.gradient(loss_b, self.second.trainable_variables),
                              self.second.trainable_variables)
        return {"a": loss_a, "b": loss_b}


def two_optimizers(distributed):
    keras.utils.set_random_seed(3)
    model = TwoOptimizers()
    model(X[:1])  # builds every layer
    first, second = keras.optimizers.SGD(0.1), keras.optimizers.Adam(0.01)
    if distributed:
        first, second = hvd.DistributedOptimizer(first), hvd.DistributedOptimizer(second)
    model.compile(first, second)
    x, y, batch = (X[MINE], Y[MINE], HALF) if distributed else (X, Y, BATCH)
    model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    return np.concatenate([w.ravel() for w in model.get_weights()])


ours, reference = two_optimizers(True), two_optimizers(False)
gathered = hvd.allgather(ours[None, :])
if hvd.rank() == 0:
    keras.utils.set_random_seed(3)
    start = TwoOptimizers()
    start(X[:1])
    initial = np.concatenate([w.ravel() for w in start.get_weights()])
    emit({"check": "two_optimizers", "max_abs": float(np.max(np.abs(ours - reference))),
          "identical": bool(np.array_equal(gathered[0], gathered[1])),
          "moved": float(np.max(np.abs(reference - initial)))})


def small(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", steps_per_execution=2)
    return model


# steps_per_execution=2: Keras calls batch hooks once per 2 steps; LocalSGD(period=4) must see 6
# optimizer steps per epoch, not 3
if hvd.rank() == 0:
    small(9)  # rank 0 built a model first: its next layers are numbered on (dense_2, ...)
model = small(5)
agent = hva.KerasAgent(model, strategy=hva.LocalSGD(period=4))
agent.fit(X[MINE], Y[MINE], batch_size=HALF, epochs=2, shuffle=False)
state = agent.runner_state
iterations = int(model.optimizer.iterations.numpy())
agent.close()
paths = hva.init().comm.allgather([w.path for w in model.weights])
if hvd.rank() == 0:
    emit({"check": "steps_per_execution", "counted": state.step, "iterations": iterations,
          "last_sync": state.last_sync_step, "layer_paths": paths})
