"""KerasAgent under hva.DiLoCo on 2 ranks, every check in one job (RESULT lines on rank 0):
the equivalences with Sync and LocalSGD (float64), the outer Nesterov step and the streaming
schedule against tests/scripts/_diloco_reference.py, a checkpoint (arrays + JSON) resumed, the
float16 wire, and digits."""

import os
import tempfile

import numpy as np

import hvdagents as hva

ctx = hva.init()
import keras  # noqa: E402
from _diloco_reference import B, D, regression_batches, simulate  # noqa: E402
from _report import emit, same_on_every_rank  # noqa: E402

keras.config.set_floatx("float64")  # the loss and the optimizer's learning rate too, not only the layers
comm = ctx.comm
RANK, SIZE = ctx.rank, ctx.size
batch = regression_batches(SIZE)


def report(check, **values):
    if RANK == 0:
        emit({"check": check, **values})


def identical(*arrays):
    return same_on_every_rank(comm, *(np.asarray(a) for a in arrays))


def flat(model):
    return np.concatenate([np.ravel(v.numpy()).astype(np.float64) for v in model.trainable_variables])


def make(seed, hidden=True, lr=0.05, momentum=0.0):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(12, activation="tanh", dtype="float64")] if hidden else []
    model = keras.Sequential([keras.Input((D,), dtype="float64"), *layers, keras.layers.Dense(1, dtype="float64")])
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss="mse")
    return model


def fit(agent, steps, first=0):
    """``steps`` batches of this rank's data, from batch ``first``, in order."""
    x = np.concatenate([batch(RANK, s)[0] for s in range(first, first + steps)])
    y = np.concatenate([batch(RANK, s)[1] for s in range(first, first + steps)])
    agent.fit(x, y, batch_size=B, epochs=1, shuffle=False)


def diloco(H, lr=1.0, mu=0.0, **kw):
    return hva.DiLoCo(inner_steps=H, outer_lr=lr, outer_momentum=mu, wire_dtype=kw.pop("wire_dtype", "float64"), **kw)


def run(strategy, model, steps):
    agent = hva.KerasAgent(model, strategy=strategy)
    fit(agent, steps)
    agent.close()
    return flat(model)


# -- equivalences --------------------------------------------------------------------------------
start = flat(make(1))
for check, reference, ours, steps, momentum, lr in (
    ("equals_sync", hva.Sync(), diloco(1), 7, 0.0, 0.1),
    ("equals_localsgd", hva.LocalSGD(period=3), diloco(3), 10, 0.9, 0.05),
):
    theirs = run(reference, make(1, lr=lr, momentum=momentum), steps)
    mine = run(ours, make(1, lr=lr, momentum=momentum), steps)
    report(check, max_diff=float(np.max(np.abs(mine - theirs))), moved=float(np.max(np.abs(mine - start))),
           identical=identical(mine))

# -- the outer Nesterov step (5 rounds) and streaming, against the reference ---------------------
for check, H, P, overlap, steps in (("nesterov", 3, 1, 0, 15), ("streaming_P2_H4_tau1", 4, 2, 1, 12)):
    model = make(2, hidden=False)
    agent = hva.KerasAgent(model, strategy=diloco(H, 0.7, 0.9, fragments=P, overlap=overlap))
    theta0 = flat(model)
    fit(agent, steps)
    agent.close()
    want, velocity, log = simulate(batch, SIZE, theta0, steps, H, P, overlap, 0.05, 0.7, 0.9, True)
    runner = agent._runner
    report(check, max_diff=float(np.max(np.abs(flat(model) - want))),
           momentum_diff=float(np.max(np.abs(runner.momentum - velocity))), moved=float(np.max(np.abs(want - theta0))),
           log=[list(e) for e in runner.sync_log], reference_log=[list(e) for e in log],
           momentum_same=identical(runner.momentum, runner.theta_global), identical=identical(flat(model)),
           close_is_global=bool(np.array_equal(flat(model), runner.theta_global)))

# -- checkpoints: arrays and JSON, the outer state resumed ---------------------------------------
path = comm.bcast(os.path.join(tempfile.mkdtemp(), "diloco.keras.ckpt") if RANK == 0 else None)
model = make(4, lr=0.1)
agent = hva.KerasAgent(model, strategy=diloco(3, 0.7, 0.9))
fit(agent, 6)
agent.save_checkpoint(path, epoch=2)
saved_momentum = agent._runner.momentum.copy()
fit(agent, 6, first=6)
straight, straight_momentum = flat(model), agent._runner.momentum.copy()
agent.close()
model_b = make(5, lr=0.1)
agent_b = hva.KerasAgent(model_b, strategy=diloco(3, 0.7, 0.9))
extra = agent_b.load_checkpoint(path)
loaded_momentum = agent_b._runner.momentum.copy()
fit(agent_b, 6, first=6)
report("checkpoint", epoch=int(extra["epoch"]), step=agent_b.runner_state.step,
       max_diff=comm.allgather(float(np.max(np.abs(straight - flat(model_b))))),
       momentum_diff=comm.allgather(float(np.max(np.abs(straight_momentum - agent_b._runner.momentum)))),
       loaded_momentum_bitwise=comm.allgather(bool(np.array_equal(saved_momentum, loaded_momentum))),
       momentum_nonzero=float(np.max(np.abs(saved_momentum))))
agent_b.close()
if RANK == 0:
    os.unlink(path)

# -- the float16 wire --------------------------------------------------------------------------
model = make(6)
agent = hva.KerasAgent(model, strategy=diloco(500))  # no exchange within 3 steps: each rank's own model
theta0 = flat(model)
fit(agent, 3)
deltas = comm.allgather(theta0 - flat(model))
agent.close()
largest = np.max(np.abs(deltas), axis=0)
by_wire = {}
for wire in ("float64", "float16"):
    agent = hva.KerasAgent(make(6), strategy=diloco(3, 0.7, 0.9, wire_dtype=wire))
    fit(agent, 3)
    by_wire[wire] = agent._runner.theta_global.copy()
    agent.close()
err = np.abs(by_wire["float16"] - by_wire["float64"])
bound = 0.7 * 1.9 * (SIZE * 2.0**-11 * largest + SIZE * 2.0**-24)
report("wire_float16", within=bool(np.all(err <= bound)), worst_ratio=float(np.max(err / bound)),
       max_err=float(np.max(err)))

# -- digits, the bar the other strategies meet ------------------------------------------------------
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.2, random_state=0)
mine = np.asarray(hva.shard(len(x_train)))
keras.utils.set_random_seed(0)
net = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
net.compile(optimizer=keras.optimizers.AdamW(0.001),  # the paper's inner optimizer
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
agent = hva.KerasAgent(net, strategy=hva.DiLoCo(inner_steps=8))
agent.fit(x_train[mine].astype("float32"), y_train[mine], batch_size=32, epochs=12, shuffle=True, verbose=0)
agent.close()
accuracy = float(np.mean(np.argmax(net.predict(x_test.astype("float32"), verbose=0), axis=1) == y_test))
report("digits", accuracy=accuracy, steps=agent.runner_state.step, exchanges=len(agent._runner.sync_log),
       identical=identical(flat(net)))
report("done")
