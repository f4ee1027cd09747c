"""KerasAgent(ZeRO) against KerasAgent(Sync), float64, under mpirun -np 2 or 3; one job loops
over the cases. RESULT lines on rank 0.

``keras_zero.py DIR save``  (2 ranks; 4 across the simulated hosts): equivalence, refusals, state bytes, resume; writes
DIR/two.ckpt (ZeRO stage 2, 2 ranks, after 3 steps) and the straight run's parameters after 6
and 9 steps (DIR/expected6.npy, expected9.npy).
``keras_zero.py DIR load``  (3 ranks: uneven ranges): the same cases, then two.ckpt loaded by
ZeRO (stage 1) and by Sync, 3 steps each against expected6; each saves DIR/three-<label>.ckpt,
and ZeRO (stage 2) resumes from Sync's, 3 steps against Sync's own.
"""

import os
import sys

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
from _report import emit  # noqa: E402

from hvdagents.runtime import horovod_binding  # noqa: E402

hvd = horovod_binding("tensorflow")
keras.config.set_floatx("float64")
DIRECTORY, PHASE = sys.argv[1], sys.argv[2]
STEPS, BATCH = 4, 12  # BATCH divisible by 1, 2, 3 and 4: N ranks on shards equal one process on the batch
rng = np.random.default_rng(0)
X = rng.normal(size=(12 * BATCH, 4))
Y = rng.normal(size=(12 * BATCH, 3))
PARAMETERS = 4 * 7 + 7 + 7 * 3 + 3  # 59: odd, and 59 % 3 == 2: uneven ranges on 2 and 3 ranks


def report(name, **values):
    if ctx.is_root:
        emit({"check": name, "ranks": ctx.size, **values})


OPTIMIZERS = {
    "sgd": lambda **kw: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01, **kw),
    "adam": lambda **kw: keras.optimizers.Adam(0.02, **kw),
    "adamw": lambda **kw: keras.optimizers.AdamW(0.02, weight_decay=0.1, **kw),
    "lion": lambda **kw: keras.optimizers.Lion(0.01, **kw),
}


def make(strategy, optimizer, seed=0, **options):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])
    model.compile(optimizer=OPTIMIZERS[optimizer](**options) if isinstance(optimizer, str) else optimizer,
                  loss="mse")
    return model, hva.KerasAgent(model, strategy=strategy)


def train(agent, steps, first=0):
    """``steps`` optimizer steps of agent.fit on batches ``first...``: this rank's rows of each."""
    rows = np.concatenate([np.arange(s * BATCH, (s + 1) * BATCH)[hva.shard(BATCH)]
                           for s in range(first, first + steps)])
    agent.fit(X[rows], Y[rows], batch_size=BATCH // ctx.size, epochs=1, shuffle=False)


def flat(model):
    return np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])


def identical(model):
    mine = flat(model).tobytes()
    return all(g == mine for g in hvd.allgather_object(mine))


# 1. ZeRO stage 1 and 2 equal Sync (SGD with momentum and weight decay, Adam, AdamW, Lion;
#    global_clipnorm small enough to act).
CASES = [(opt, stage, {}) for opt in ("sgd", "adam", "adamw") for stage in (1, 2)] + [
    ("adamw", 1, {"global_clipnorm": 0.05}), ("adamw", 2, {"global_clipnorm": 0.05}), ("lion", 2, {}),
]
finals, references = {}, {}
for name, stage, options in CASES:
    case = "-".join([name, f"stage{stage}", *("clip" for _ in options)])
    key = (name, tuple(sorted(options.items())))
    if key not in references:  # Sync's run, once for both stages
        model, agent = make(hva.Sync(), name, **options)
        start = flat(model)
        train(agent, STEPS)
        references[key] = start, flat(model)
        agent.close()
    start, reference = references[key]
    model, agent = make(hva.ZeRO(stage=stage), name, **options)
    train(agent, STEPS)
    finals[case] = flat(model)
    report(f"equal:{case}", max_abs=float(np.abs(flat(model) - reference).max()),
           moved=float(np.abs(reference - start).max()), identical=identical(model),
           steps=int(model.optimizer.iterations.numpy()))
    agent.close()
for stage in (1, 2):  # clipping acted: the clipped run ends elsewhere than the unclipped one
    report(f"clip_acted:stage{stage}",
           difference=float(np.abs(finals[f"adamw-stage{stage}-clip"] - finals[f"adamw-stage{stage}"]).max()))

# 2. Optimizers (and settings) that cannot be cut into ranges are refused on every rank, by name.


class MyAdam(keras.optimizers.Adam):
    pass


REFUSED = [("adafactor", lambda: keras.optimizers.Adafactor(0.01)), ("subclass", lambda: MyAdam(0.01)),
           ("lossscale", lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))),
           ("clipnorm", lambda: keras.optimizers.Adam(0.01, clipnorm=1.0))]
for label, build in REFUSED:
    try:
        make(hva.ZeRO(stage=2), build())
        outcome = "accepted"
    except Exception as err:  # noqa: BLE001 - reported
        outcome = f"{type(err).__name__}: {err}"
    report(f"refused:{label}", outcomes=hvd.allgather_object(outcome))

# 3. Optimizer state per rank: Adam's two moments for this rank's range of the 59 elements.
model, agent = make(hva.Sync(), "adam")
train(agent, 2)
sync_bytes = agent.optimizer_state_bytes()
agent.close()
for stage in (1, 2):
    user = OPTIMIZERS["adam"]()
    model, agent = make(hva.ZeRO(stage=stage), user)
    train(agent, 2)
    report(f"state_bytes:stage{stage}", per_rank=hvd.allgather_object(agent.optimizer_state_bytes()),
           sync=sync_bytes, user_built=bool(user.built))
    agent.close()

# 4a. Frozen layers: the first Dense has trainable=False before the agent is made (Adam). ZeRO
#     equals Sync, the frozen weights keep their bits, and the ranges cut the 24 trainable
#     elements only (the state per rank is checked against that count).
def make_frozen(strategy):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7, activation="tanh"), keras.layers.Dense(3)])
    model.layers[0].trainable = False
    model.compile(optimizer=OPTIMIZERS["adam"](), loss="mse")
    return model, hva.KerasAgent(model, strategy=strategy)


def weights(model):
    return np.concatenate([np.ravel(v.numpy()) for v in model.weights])


model, agent = make_frozen(hva.Sync())
frozen_start = weights(model)
train(agent, STEPS)
frozen_reference, frozen_sync_bytes = weights(model), agent.optimizer_state_bytes()
agent.close()
for stage in (1, 2):
    model, agent = make_frozen(hva.ZeRO(stage=stage))
    train(agent, STEPS)
    kernel = model.layers[0].kernel.numpy().size + model.layers[0].bias.numpy().size  # 35 frozen, first
    report(f"frozen:stage{stage}", max_abs=float(np.abs(weights(model) - frozen_reference).max()),
           moved=float(np.abs(frozen_reference - frozen_start).max()), identical=identical(model),
           frozen_kept=bool(np.array_equal(weights(model)[:kernel], frozen_start[:kernel])),
           per_rank=hvd.allgather_object(agent.optimizer_state_bytes()), sync=frozen_sync_bytes)
    agent.close()

# 4b. Uneven shards: rank r holds 9 + 3r rows; agent.fit evens them out (the longest shard's
#     batches on every rank) under ZeRO as under Sync, and ends equal to Sync run the same way.
uneven_rows = np.arange(40 * ctx.rank, 40 * ctx.rank + 9 + 3 * ctx.rank)


def train_uneven(strategy):
    model, agent = make(strategy, "adam")
    history = agent.fit(X[uneven_rows], Y[uneven_rows], batch_size=4, epochs=2, shuffle=False)
    steps = int(model.optimizer.iterations.numpy())
    agent.close()
    return model, steps, history


model, sync_steps, _ = train_uneven(hva.Sync())
uneven_reference = flat(model)
for stage in (1, 2):
    model, steps, _ = train_uneven(hva.ZeRO(stage=stage))
    report(f"uneven:stage{stage}", max_abs=float(np.abs(flat(model) - uneven_reference).max()),
           identical=identical(model), steps=hvd.allgather_object(steps), sync_steps=sync_steps)

# 5. Checkpoints: resume bitwise at the same world size; a whole state across world sizes and strategies.
if PHASE == "save":
    model, agent = make(hva.ZeRO(stage=2), "adam")
    train(agent, 3)
    path = os.path.join(DIRECTORY, "two.ckpt")
    agent.save_checkpoint(path, epoch=3)
    train(agent, 3, first=3)
    straight6 = flat(model)
    train(agent, 3, first=6)
    if ctx.is_root:
        np.save(os.path.join(DIRECTORY, "expected6.npy"), straight6)
        np.save(os.path.join(DIRECTORY, "expected9.npy"), flat(model))
    agent.close()
    model, agent = make(hva.ZeRO(stage=2), "adam", seed=1 + ctx.rank)  # another model: loading replaces it
    extra = agent.load_checkpoint(path)
    train(agent, 3, first=3)
    report("resume", epoch=extra["epoch"], bitwise=bool(np.array_equal(flat(model), straight6)),
           identical=identical(model))
    agent.close()
else:
    expected6 = np.load(os.path.join(DIRECTORY, "expected6.npy"))
    for label, strategy in [("zero1", hva.ZeRO(stage=1)), ("sync", hva.Sync())]:
        model, agent = make(strategy, "adam", seed=1 + ctx.rank)
        extra = agent.load_checkpoint(os.path.join(DIRECTORY, "two.ckpt"))
        train(agent, 3, first=3)
        report(f"load:{label}", epoch=extra["epoch"], max_abs=float(np.abs(flat(model) - expected6).max()),
               identical=identical(model))
        agent.save_checkpoint(os.path.join(DIRECTORY, f"three-{label}.ckpt"), epoch=6)
        if label == "zero1" and ctx.is_root:
            np.save(os.path.join(DIRECTORY, "three_params.npy"), flat(model))
        if label == "sync":
            train(agent, 3, first=6)
            sync9 = flat(model)
        agent.close()
    model, agent = make(hva.ZeRO(stage=2), "adam", seed=1 + ctx.rank)  # Sync's checkpoint resumes under ZeRO
    extra = agent.load_checkpoint(os.path.join(DIRECTORY, "three-sync.ckpt"))
    train(agent, 3, first=6)
    report("load:from_sync", epoch=extra["epoch"], max_abs=float(np.abs(flat(model) - sync9).max()),
           identical=identical(model))
    agent.close()
