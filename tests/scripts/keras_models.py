"""The models users really train, KerasAgent under mpirun -np 2: BatchNorm statistics in the
consensus for every strategy, mixed precision, uneven shards. RESULT lines on rank 0."""

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _report import emit  # noqa: E402

rng = np.random.default_rng(0)
W = rng.normal(size=(8, 1))
X = rng.normal(size=(512, 8)).astype("float32")
Y = (X @ W + 3.0).astype("float32")


def report(name, **values):
    if ctx.is_root:
        emit({"check": name, **values})


def all_weights(model):
    return b"".join(np.asarray(v.numpy(), dtype=np.float64).tobytes() for v in model.weights)


def identical(model):
    mine = all_weights(model)
    return all(g == mine for g in ctx.comm.allgather(mine))


def regression_model(seed, optimizer=None, bn=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu")]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1, dtype="float32"))
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01), loss="mse")
    return model


# 1. BatchNorm moving statistics end identical on every rank, for every strategy.
STRATEGIES = {
    "sync": hva.Sync(), "localsgd": hva.LocalSGD(period=3), "downpour": hva.Downpour(period=2),
    "easgd": hva.EASGD(alpha=0.3, period=2), "gossip": hva.Gossip(period=2),
}
for name, strategy in STRATEGIES.items():
    model = regression_model(1, bn=True)
    agent = hva.KerasAgent(model, strategy=strategy)
    x = X[:64] + ctx.rank  # each rank sees other data: its moving statistics differ
    agent.fit(x, x @ W.astype("float32"), batch_size=16, epochs=1, verbose=0, shuffle=False)
    moving = [v for v in model.non_trainable_weights if "moving_mean" in v.path][0]
    differed = len(set(ctx.comm.allgather(moving.numpy().tobytes()))) > 1
    agent.close()
    report("keras_consensus", strategy=name, differed_before=differed, identical=identical(model))


# 2. Mixed precision trains like float32 (KerasAgent puts the all-reduce outside loss scaling).
def train_loss(policy, optimizer_factory):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = regression_model(2, optimizer=optimizer_factory())
        agent = hva.KerasAgent(model, strategy=hva.Sync())
        history = agent.fit(hva.shard(X), hva.shard(Y), batch_size=16, epochs=5, verbose=0, shuffle=False)
        agent.close()
        return history.history["loss"], type(model.optimizer.inner_optimizer).__name__, identical(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")


f32, _, _ = train_loss("float32", lambda: keras.optimizers.SGD(0.01))
mixed, inner, same = train_loss("mixed_float16", lambda: keras.optimizers.SGD(0.01))
user_order, inner_user, same_user = train_loss(
    "mixed_float16", lambda: hva.keras.DistributedOptimizer(keras.optimizers.SGD(0.01)))
report("mixed_precision", float32=f32, mixed=mixed, inner=inner, identical=same,
       user_order=user_order, inner_user=inner_user, identical_user=same_user)

# 3. The wrong order under plain model.fit is refused with the fix.
keras.mixed_precision.set_global_policy("mixed_float16")
model = regression_model(3, optimizer=hva.keras.DistributedOptimizer(keras.optimizers.SGD(0.01)))
keras.mixed_precision.set_global_policy("float32")
try:
    model.fit(X[:32], Y[:32], batch_size=16, epochs=1, verbose=0,
              callbacks=[hva.keras.callbacks.BroadcastGlobalVariablesCallback()])
    message = "no error"
except hva.UsageError as err:
    message = str(err)
report("loss_scale_order", message=message)

# 4. Uneven shards: rank r holds (3 + r) batches of 8. Documented rule: shorter shards are
#    lengthened by repeating their own items; each step averages the ranks' mean gradients.
BATCH = 8


def shard_of(rank):
    start = 100 * rank
    return X[start:start + (3 + rank) * BATCH], Y[start:start + (3 + rank) * BATCH]


model = regression_model(4)
initial = [v.numpy() for v in model.trainable_variables]
agent = hva.KerasAgent(model, strategy=hva.Sync())
history = agent.fit(*shard_of(ctx.rank), batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
agent.close()
reference = regression_model(4)
for v, value in zip(reference.trainable_variables, initial):
    v.assign(value)
longest = (3 + ctx.size - 1) * BATCH
padded = [tuple(np.take(a, np.arange(longest) % len(a), axis=0) for a in shard_of(r)) for r in range(ctx.size)]
sgd = keras.optimizers.SGD(0.01)
for _ in range(2):
    for step in range(longest // BATCH):
        grads = []
        for x, y in padded:
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y[step * BATCH:(step + 1) * BATCH],
                                                       reference(x[step * BATCH:(step + 1) * BATCH]))
            grads.append(tape.gradient(loss, reference.trainable_variables))
        sgd.apply([sum(g) / len(g) for g in zip(*grads)], reference.trainable_variables)
ours = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
theirs = np.concatenate([np.ravel(v.numpy()) for v in reference.trainable_variables])
report("uneven_sync", identical=identical(model), epochs=len(history.history["loss"]),
       max_rel=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))))

model = regression_model(5)
with hva.KerasAgent(model, strategy=hva.LocalSGD(period=2)) as agent:
    agent.fit(*shard_of(ctx.rank), batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
report("uneven_localsgd", identical=identical(model))
