"""One plain process (no mpirun): the checkpoint KerasAgent(ZeRO) saved on 3 ranks
(DIR/three-zero1.ckpt) loads under KerasAgent(Sync) alone, and 3 more steps on whole batches equal
the 2-rank straight run after 9 steps. One RESULT line."""

import os
import sys

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
from _report import emit  # noqa: E402

keras.config.set_floatx("float64")
DIRECTORY = sys.argv[1]
BATCH = 12
rng = np.random.default_rng(0)  # the data of keras_zero.py
X = rng.normal(size=(12 * BATCH, 4))
Y = rng.normal(size=(12 * BATCH, 3))

keras.utils.set_random_seed(5)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])
model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
agent = hva.KerasAgent(model, strategy=hva.Sync())
extra = agent.load_checkpoint(os.path.join(DIRECTORY, "three-zero1.ckpt"))
flat = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
loaded = bool(np.array_equal(flat, np.load(os.path.join(DIRECTORY, "three_params.npy"))))
agent.fit(X[6 * BATCH:9 * BATCH], Y[6 * BATCH:9 * BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
flat = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
emit({"check": "plain", "size": ctx.size, "epoch": extra["epoch"], "loaded_bitwise": loaded,
      "steps": int(model.optimizer.iterations.numpy()),
      "max_abs": float(np.abs(flat - np.load(os.path.join(DIRECTORY, "expected9.npy"))).max())})
agent.close()
