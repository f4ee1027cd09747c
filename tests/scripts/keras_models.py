"""The models users really train, KerasAgent under mpirun -np 2: the model after close() for
every strategy, mixed precision (one rank overflowing), uneven shards.
RESULT lines on rank 0."""

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _consensus import expected_parameters, max_abs, ulps  # noqa: E402
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


# 1. After close(): the model the README promises, for every strategy: trainable weights from
#    the strategy, BatchNorm's moving statistics (non-trainable) the float64 mean over the
#    ranks; both against references computed here (_consensus.py). float32 only: Horovod's
#    TensorFlow ops refuse bfloat16, so a bfloat16 KerasAgent cannot even start under Sync.
STRATEGIES = {
    "sync": (hva.Sync, {}, 1), "localsgd": (hva.LocalSGD, {"period": 3}, 3),
    "downpour": (hva.Downpour, {"period": 2}, 2), "easgd": (hva.EASGD, {"alpha": 0.3, "period": 2}, 2),
    "gossip": (hva.Gossip, {"period": 2}, 2),
}
EPS = float(np.finfo(np.float32).eps)


def flat(variables):
    return np.concatenate([np.ravel(np.asarray(v.numpy(), dtype=np.float64)) for v in variables])


class LocalProgress(keras.callbacks.Callback):
    """The sum of what this rank's optimizer steps changed (given before the agent's
    callbacks, so it sees each step before the strategy's exchange)."""

    def __init__(self):
        super().__init__()
        self.total = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.before = flat(self.model.trainable_variables)

    def on_train_batch_end(self, batch, logs=None):
        self.total = self.total + flat(self.model.trainable_variables) - self.before


for name, (make, settings, period) in STRATEGIES.items():
    model = regression_model(1, bn=True)
    agent = hva.KerasAgent(model, strategy=make(**settings))
    x0 = flat(model.trainable_variables)
    x = X[:80] + ctx.rank  # each rank sees other data: its moving statistics differ
    progress = LocalProgress()  # 5 steps: not a multiple of any period
    model.fit(x, x @ W.astype("float32"), batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[progress, *agent.callbacks()])
    pre = ctx.comm.gather((flat(model.trainable_variables), flat(model.non_trainable_weights),
                           progress.total), root=0)
    agent.close()
    after, stats = flat(model.trainable_variables), flat(model.non_trainable_weights)
    same = identical(model)
    if ctx.is_root:
        models, moving, sums = zip(*pre)
        want = expected_parameters(name, x0, models, sums, period)
        mean = np.mean(moving, axis=0)
        report("keras_consensus", strategy=name, identical=same,
               models_identical_before=all(np.array_equal(m, models[0]) for m in models),
               params_spread=max(max_abs(m, want) for m in models), params_error=max_abs(after, want),
               moving_spread_ulps=max(ulps(m, mean, EPS) for m in moving),
               moving_error_ulps=ulps(stats, mean, EPS))


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

# 2b. Mixed precision, only rank 1 overflows at one step: the loss-scale optimizer decides on
#     the averaged (infinite) gradients, so every rank skips that step and halves its scale.
OVERFLOW_BATCH = 3


class StepRecord(keras.callbacks.Callback):
    """After every batch: this rank's weights (bytes) and loss scale."""

    def __init__(self):
        super().__init__()
        self.weights, self.scales = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(all_weights(self.model))
        outer = self.model.optimizer  # KerasAgent's order: DistributedOptimizer(LossScaleOptimizer)
        scaling = outer if isinstance(outer, keras.optimizers.LossScaleOptimizer) else outer.inner_optimizer
        self.scales.append(float(scaling.dynamic_scale.numpy()))


keras.mixed_precision.set_global_policy("mixed_float16")
model = regression_model(6, optimizer=keras.optimizers.SGD(0.01))
keras.mixed_precision.set_global_policy("float32")
agent = hva.KerasAgent(model, strategy=hva.Sync())
x, y = hva.shard(X[:128]), hva.shard(Y[:128])
if ctx.rank == 1:  # beyond float16 (65504): this rank's activations and gradients are infinite
    x = x.copy()
    x[OVERFLOW_BATCH * 8:(OVERFLOW_BATCH + 1) * 8] = 1e6
record = StepRecord()
start_weights = all_weights(model)
agent.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[record])
agent.close()
steps = ctx.comm.gather((record.weights, record.scales), root=0)
if ctx.is_root:
    weights = [[start_weights, *w] for w, _ in steps]  # weights[rank][k]: before batch k
    report("one_rank_overflows", batches=len(record.scales),
           identical_every_step=all(w == weights[0] for w in weights),
           skipped=[w[OVERFLOW_BATCH + 1] == w[OVERFLOW_BATCH] for w in weights],
           stepped_before=[w[OVERFLOW_BATCH] != w[OVERFLOW_BATCH - 1] for w in weights],
           stepped_after=[w[OVERFLOW_BATCH + 2] != w[OVERFLOW_BATCH + 1] for w in weights],
           scales=[sc for _, sc in steps], overflow_batch=OVERFLOW_BATCH)

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
