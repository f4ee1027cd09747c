"""Sync-training checks for KerasAgent and hva.keras, under mpirun -np 2. RESULT lines on rank 0."""

import tempfile

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
from _report import emit  # noqa: E402

from hvdagents.runtime import horovod_binding  # noqa: E402

hvd = horovod_binding("tensorflow")
STEPS, BATCH, LR = 6, 16, 0.1
rng = np.random.default_rng(0)
X = rng.normal(size=(STEPS * BATCH, 10)).astype("float32")
Y = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
HALF = BATCH // 2
# rank r trains on its half of every batch: rows [s*B + r*B/2, s*B + (r+1)*B/2) of batch s
mine = np.concatenate([np.arange(s * BATCH + ctx.rank * HALF, s * BATCH + (ctx.rank + 1) * HALF) for s in range(STEPS)])


def report(name, **values):
    if ctx.is_root:
        emit({"check": name, **values})


def make_model(seed, lr=LR, momentum=0.0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss="mse")
    return model


def flat(model):
    return np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])


initial = flat(make_model(100))  # rank 0's seed
model = make_model(100 + ctx.rank)
agent = hva.KerasAgent(model, strategy=hva.Sync())
report("starts_from_rank0", equal=bool(np.array_equal(flat(model), initial)))

agent.fit(X[mine], Y[mine], batch_size=HALF, epochs=1, shuffle=False)
ours = flat(model)
reference = make_model(100)
reference.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
theirs = flat(reference)
report("equivalence", max_rel=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))),
       moved=float(np.max(np.abs(theirs - initial))))
gathered = hvd.allgather_object(ours.tobytes())
report("identical", identical=all(g == gathered[0] for g in gathered), ranks=len(gathered))

# LocalSGD(period=1) with plain SGD gives Sync's parameters
model2 = make_model(100 + ctx.rank)
agent2 = hva.KerasAgent(model2, strategy=hva.LocalSGD(period=1))
agent2.fit(X[mine], Y[mine], batch_size=HALF, epochs=1, shuffle=False)
agent2.close()
report("localsgd_equals_sync", max_abs=float(np.max(np.abs(flat(model2) - ours))))

# metric averaging: each rank logs a different known value
logs = {"loss": float(ctx.rank + 1), "acc": 10.0 * ctx.rank}
hva.keras.callbacks.MetricAverageCallback().on_epoch_end(0, logs)
report("metric_average", logs=logs)

# LR warm-up: values at chosen batches, read back from the optimizer
warm = hva.keras.callbacks.LearningRateWarmupCallback(initial_lr=0.1, warmup_epochs=2, steps_per_epoch=10)
warm.set_model(model)
seen = {}
warm.on_train_begin()
for epoch, batch in [(0, 0), (0, 5), (1, 0), (1, 9), (2, 0), (2, 5)]:
    warm.on_epoch_begin(epoch)
    warm.on_train_batch_begin(batch)
    seen[f"{epoch}.{batch}"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
# data of unknown length (fit's params say steps None) and no steps_per_epoch: refused
unknown = hva.keras.callbacks.LearningRateWarmupCallback(initial_lr=0.1, warmup_epochs=2)
unknown.set_model(model)
unknown.set_params({"epochs": 3, "steps": None, "verbose": 0})
try:
    unknown.on_train_begin()
    refused = "no error"
except ValueError as err:
    refused = str(err)
report("warmup", lr=seen, size=ctx.size, unknown_length=refused)

# checkpoint after 2 epochs + resume 1 == 3 straight (momentum: optimizer state matters)
straight = make_model(7, momentum=0.9)
a_straight = hva.KerasAgent(straight, strategy=hva.Sync())
a_straight.fit(X[mine], Y[mine], batch_size=HALF, epochs=3, shuffle=False)
with tempfile.TemporaryDirectory() as tmp:
    path = hvd.broadcast_object(tmp, root_rank=0) + "/ckpt.pkl"
    first = make_model(7, momentum=0.9)
    a_first = hva.KerasAgent(first, strategy=hva.Sync())
    a_first.fit(X[mine], Y[mine], batch_size=HALF, epochs=2, shuffle=False, checkpoint=path)
    hvd.allreduce(np.zeros(1), name="barrier")
    second = make_model(99, momentum=0.9)
    a_second = hva.KerasAgent(second, strategy=hva.Sync())
    extra = a_second.load_checkpoint(path)
    a_second.fit(X[mine], Y[mine], batch_size=HALF, epochs=3, initial_epoch=extra["epoch"], shuffle=False)
report("resume", max_abs=float(np.max(np.abs(flat(second) - flat(straight)))), epoch=extra["epoch"],
       moved=float(np.max(np.abs(flat(straight) - flat(make_model(7))))))
