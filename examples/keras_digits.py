"""Train an MLP on scikit-learn's digits with Keras 3 (TensorFlow backend) on every rank.

    mpirun -np 2 python examples/keras_digits.py --epochs 12
    mpirun -np 4 python examples/keras_digits.py --strategy downpour

Rank 0 prints Keras' per-epoch progress, logs epochs to --csv, checkpoints to --checkpoint,
and prints the final test accuracy of the model every rank agrees on after ``agent.close()``.
"""

from __future__ import annotations

import os

import numpy as np

import hvdagents as hva
from hvdagents.metrics import MetricsLog
from hvdagents.preemption import PreemptionFlag

import _digits


def main(argv: list[str] | None = None, default_strategy: str = "sync") -> float | None:
    args = _digits.parser(__doc__.splitlines()[0], default_strategy).parse_args(argv)
    # SIGUSR1 (SLURM preemption, slurm/requeue.sbatch): checkpoint at the epoch's end, exit 75
    preempted = PreemptionFlag() if args.checkpoint else None
    ctx = hva.init()  # pins this rank to its local rank's GPU before TensorFlow starts
    if args.device == "cpu":
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    import keras

    keras.utils.set_random_seed(args.seed + ctx.rank)  # differs per rank: the agent broadcasts rank 0's
    x_train, y_train, x_test, y_test = _digits.load()
    x, y = _digits.my_shard(x_train, y_train, ctx)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ])
    model.compile(
        optimizer=keras.optimizers.SGD(args.lr, momentum=args.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    agent = hva.KerasAgent(model, strategy=_digits.strategy_from(args))
    start_epoch = 0
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        start_epoch = agent.load_checkpoint(args.checkpoint)["epoch"]
    callbacks = []
    if args.csv:
        log = MetricsLog(args.csv, is_root=ctx.is_root, append=start_epoch > 0)
        def log_epoch(epoch: int, logs: dict) -> None:  # rank 0's model on the test split, as torch_digits
            if ctx.is_root:
                test_accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
                log.log(epoch=epoch + 1, loss=logs["loss"], accuracy=test_accuracy,
                        train_accuracy=logs["accuracy"])

        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=log_epoch, on_train_end=lambda logs: log.close()))
    if preempted is not None:  # after the agent's checkpoint callback, which fit() puts first

        def stop_if_preempted(epoch: int, logs: dict) -> None:
            if preempted.should_stop():  # collective: same answer everywhere
                model.stop_training = True

        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=stop_if_preempted))
    agent.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, initial_epoch=start_epoch,
              shuffle=True, verbose=2, callbacks=callbacks, checkpoint=args.checkpoint)
    if preempted is not None and preempted.should_stop():
        preempted.exit_for_requeue()
    local_steps = agent.runner_state.step
    agent.close()  # one consensus model on every rank
    steps_per_rank = ctx.comm.gather(local_steps, root=0) if ctx.mpi_world else [local_steps]
    if not ctx.is_root:
        return None
    final = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    print(f"strategy: {args.strategy}, ranks: {ctx.size}, steps per rank: {steps_per_rank}")
    print(f"final test accuracy: {final:.4f}")
    return final


if __name__ == "__main__":
    main()
