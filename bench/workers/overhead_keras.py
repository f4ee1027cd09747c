"""KerasAgent(Sync) against a minimal hand-written Horovod + Keras 3 loop, interleaved.

Three variants train in one MPI job, in rotating order, on the same fixed data:

- ``bare``: a ``tf.function`` step, ``tape.gradient`` -> ``hvd.grouped_allreduce`` ->
  ``optimizer.apply``, on its own copy of the MLP;
- ``ours``: the same loop on the KerasAgent's model, whose optimizer the agent wrapped in
  ``hva.keras.DistributedOptimizer`` (so the step is ``model.optimizer.apply(grads)``);
- ``ours_fit``: ``agent.fit`` on the same model (Keras' ``model.fit`` with the agent's callbacks),
  one epoch of ``steps`` batches per call. Its rate is timed between the first and the last
  ``on_train_batch_end``, so it is the steady-state rate inside ``fit``; the rest of the call
  (Keras' set-up: data adapter, iterator, callbacks) is reported apart as ``fit_setup_s``;
- ``model_fit``: Keras' own ``model.fit`` on the same model without the agent's callbacks, timed
  the same way: what ``agent.fit`` adds to Keras' fit loop.

Rank 0 prints the steps per second of every repetition (the slowest rank's).
"""

from __future__ import annotations

import time

import horovod.tensorflow as hvd
import keras
import numpy as np
import tensorflow as tf
from mpi4py import MPI  # mpi4py initialises MPI at MPI_THREAD_MULTIPLE, as Horovod needs

import hvdagents as hva
from bench.workers._util import emit, overhead_args, timed
from hvdagents.runtime import horovod_binding

LR = 0.01
MOMENTUM = 0.9
SEED = 0


def build(dims: list[int]) -> keras.Model:
    keras.utils.set_random_seed(SEED)
    layers: list = [keras.Input((dims[0],))]
    layers += [keras.layers.Dense(d, activation="relu") for d in dims[1:-1]]
    layers.append(keras.layers.Dense(dims[-1]))
    return keras.Sequential(layers)


class _BatchClock(keras.callbacks.Callback):
    """Records the time of every ``on_train_batch_end``."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter())


def main() -> None:
    args = overhead_args()
    comm = MPI.COMM_WORLD
    horovod_binding("tensorflow")  # Horovod started as the agents start it (hvdagents' settings), shared by all loops
    rng = np.random.default_rng(SEED + comm.Get_rank())
    x_np = rng.standard_normal((args.steps * args.batch, args.dims[0])).astype(np.float32)
    y_np = rng.integers(0, args.dims[-1], args.steps * args.batch).astype(np.int64)
    x, y = tf.constant(x_np[:args.batch]), tf.constant(y_np[:args.batch])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # bare Horovod + Keras 3: what a user writes without hvdagents (horovod.keras is broken)
    bare_model = build(args.dims)
    bare_opt = keras.optimizers.SGD(LR, momentum=MOMENTUM)
    bare_opt.build(bare_model.trainable_variables)
    for i, v in enumerate(bare_model.weights + bare_opt.variables):
        v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=0, name=f"bare.bcast.{i}"))

    @tf.function
    def bare_train_step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, bare_model(xb, training=True))
        grads = tape.gradient(loss, bare_model.trainable_variables)
        grads = hvd.grouped_allreduce(grads, op=hvd.Average, name="bare.grads")
        bare_opt.apply(grads, bare_model.trainable_variables)
        return loss

    # hvdagents
    our_model = build(args.dims)
    our_model.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM), loss=loss_fn)
    agent = hva.KerasAgent(our_model, strategy=hva.Sync())

    @tf.function
    def our_train_step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, our_model(xb, training=True))
        grads = tape.gradient(loss, our_model.trainable_variables)
        our_model.optimizer.apply(grads, our_model.trainable_variables)
        return loss

    def loop(step):
        def run(n: int) -> None:
            for _ in range(n):
                step(x, y)
        return run

    batch_ends = _BatchClock()

    def agent_fit(n: int) -> None:
        agent.fit(x_np[:n * args.batch], y_np[:n * args.batch], batch_size=args.batch, epochs=1,
                  shuffle=False, verbose=0, callbacks=[batch_ends])

    def model_fit(n: int) -> None:
        our_model.fit(x_np[:n * args.batch], y_np[:n * args.batch], batch_size=args.batch, epochs=1,
                      shuffle=False, verbose=0, callbacks=[batch_ends])

    variants = {"ours": loop(our_train_step), "bare": loop(bare_train_step), "ours_fit": agent_fit,
                "model_fit": model_fit}
    fits = ("ours_fit", "model_fit")
    for run in variants.values():
        run(max(args.warmup, 2))
    rates: dict[str, list[float]] = {name: [] for name in variants}
    setup: dict[str, list[float]] = {name: [] for name in fits}
    names = list(variants)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            batch_ends.times.clear()
            seconds = timed(comm, lambda run=variants[name]: run(args.steps))
            if name in fits:
                ends = batch_ends.times
                inside = comm.allreduce(ends[-1] - ends[0], op=MPI.MAX)
                rates[name].append((len(ends) - 1) / inside)
                setup[name].append(seconds - args.steps * inside / (len(ends) - 1))
            else:
                rates[name].append(args.steps / seconds)
    params = int(sum(np.prod(v.shape) for v in our_model.trainable_variables))
    agent.close()
    if comm.Get_rank() == 0:
        emit({"framework": "keras", "ranks": comm.Get_size(), "parameters": params, "dims": args.dims,
              "batch": args.batch, "steps": args.steps, "steps_per_s": rates, "fit_setup_s": setup})


if __name__ == "__main__":
    main()
