"""The node-leader hierarchy on 2 simulated hosts x 2 ranks, every check in one job (RESULT lines
on rank 0): LocalSGD and DiLoCo with hierarchical=True against the flat versions (float64, torch
and Keras), LocalSGD's two-level period step by step, and the bytes that leave each host per
exchange, flat and hierarchical (each host's link counter, read inside the host).
``--bytes-only``: the bytes checks alone (run again under another MPI all-reduce algorithm)."""

import socket
import sys

import numpy as np
import torch
from _diloco_reference import D, regression_batches
from _report import emit, same_on_every_rank

import hvdagents as hva
from hvdagents.strategies.hierarchy import cross_node_bytes

ctx = hva.init()
comm = ctx.comm
RANK, SIZE, LOCAL = ctx.rank, ctx.size, ctx.local_size
HOST = socket.gethostname()
HOSTS = comm.allgather(HOST)
NODES = len(set(HOSTS))
batch = regression_batches(SIZE)


def report(check, **values):
    if RANK == 0:
        emit({"check": check, **values})


def flat(model):
    return torch.cat([t.detach().reshape(-1).double() for t in model.parameters()]).numpy()


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).double()


def sgd_step(model, optimizer, step):
    x, y = (torch.from_numpy(a) for a in batch(RANK, step))
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def train(strategy, steps, seed=1, momentum=0.9):
    model = mlp(seed)
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), strategy=strategy)
    for s in range(steps):
        sgd_step(model, agent.optimizer, s)
    agent.close()
    return flat(model)


def versus(check, flat_result, tree_result, start):
    """The hierarchical result against the flat one: largest relative difference, how far
    training moved, whether the ranks hold the same bits."""
    scale = np.max(np.abs(flat_result))
    report(check, rel_diff=float(np.max(np.abs(tree_result - flat_result)) / scale),
           moved=float(np.max(np.abs(tree_result - start))), identical=same_on_every_rank(comm, tree_result))


# -- equal to the flat versions (float64) -----------------------------------------------------------
def equalities():
    start = flat(mlp(1))
    versus("localsgd", train(hva.LocalSGD(period=3), 10), train(hva.LocalSGD(period=3, hierarchical=True), 10),
           start)
    steps = 10 if RANK != SIZE - 1 else 7  # uneven: the last rank stops early (the flat fallback)
    versus("localsgd_uneven", train(hva.LocalSGD(period=3), steps),
           train(hva.LocalSGD(period=3, hierarchical=True), steps), start)
    for check, kw, n in (("diloco", {"inner_steps": 3}, 10),
                         ("diloco_streaming", {"inner_steps": 4, "fragments": 2, "overlap": 1}, 12)):
        flat_result, tree_result = (train(hva.DiLoCo(outer_lr=0.7, outer_momentum=0.9, wire_dtype="float64",
                                                     hierarchical=tree, **kw), n) for tree in (False, True))
        versus(check, flat_result, tree_result, start)


# -- LocalSGD's two levels: the node every 2 steps, everyone every 4 ---------------------------------
def two_level():
    model = mlp(2)
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.05),
                           strategy=hva.LocalSGD(period=4, node_period=2, hierarchical=True))
    seen = []
    for s in range(8):
        if s == 1:  # the reference of the node-only average after step 2: each rank's own step, then
            twin = mlp(2)  # the mean over the ranks of this host, written here with plain torch and MPI
            twin.load_state_dict(model.state_dict())
            sgd_step(twin, torch.optim.SGD(twin.parameters(), lr=0.05), s)
            everyone = comm.allgather(flat(twin))
            reference = np.mean([v for v, h in zip(everyone, HOSTS) if h == HOST], axis=0)
        sgd_step(model, agent.optimizer, s)
        if s == 1:
            node_mean_diff = float(np.max(np.abs(flat(model) - reference)))
        values = comm.allgather(flat(model))
        same_node = all(np.array_equal(values[r], values[q]) for r in range(SIZE) for q in range(SIZE)
                        if HOSTS[r] == HOSTS[q])
        across = all(np.array_equal(values[r], values[q]) for r in range(SIZE) for q in range(SIZE))
        seen.append([s + 1, same_node, across])
    agent.close()
    report("two_level", seen=seen, node_mean_diff=max(comm.allgather(node_mean_diff)), nodes=NODES,
           local_size=LOCAL)


# -- bytes across the hosts per exchange ----------------------------------------------------------
def tx_bytes():
    """Bytes this host has sent on its links (every interface but the loopback, from
    /proc/net/dev, which shows this process's network namespace: the simulated host's)."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() != "lo":
                total += int(data.split()[8])
    return total


def across_hosts(step):
    """Bytes all hosts sent to each other while every rank ran ``step()`` (between barriers)."""
    comm.Barrier()
    before = tx_bytes()
    step()
    comm.Barrier()
    after = tx_bytes()
    return sum(sent for sent, local_rank in comm.allgather((after - before, ctx.local_rank)) if local_rank == 0)


WIDE = 1024  # a Linear(1024, 1024) in float64: 1,049,600 parameters, 8.4 MB


def wide_step_bytes(strategy):
    torch.manual_seed(3)
    model = torch.nn.Linear(WIDE, WIDE).double()
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.01), strategy=strategy)
    x = torch.randn(4, WIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(RANK))

    def step():
        agent.optimizer.zero_grad()
        model(x).square().mean().backward()
        agent.optimizer.step()

    def counter():
        summer = agent._runner._summer
        return summer.hierarchy.sent_across_nodes if summer is not None else 0

    step()  # the first exchange (Horovod's and MPI's connections are made)
    before = counter()
    measured = [across_hosts(step) for _ in range(2)]
    counted = (counter() - before) // 2  # per exchange
    agent.close()
    n = sum(p.numel() for p in model.parameters())
    return min(measured), n, max(comm.allgather(counted))


def bytes_checks():
    """Bytes across the hosts per exchange, flat and hierarchical."""
    for check, make in (("bytes_localsgd", lambda tree: hva.LocalSGD(period=1, hierarchical=tree)),
                        ("bytes_diloco", lambda tree: hva.DiLoCo(inner_steps=1, wire_dtype="float32",
                                                                  hierarchical=tree))):
        flat_bytes, n, _ = wide_step_bytes(make(False))
        tree_bytes, _, counted = wide_step_bytes(make(True))
        itemsize = 8 if check == "bytes_localsgd" else 4
        report(check, flat=flat_bytes, tree=tree_bytes, elements=n, itemsize=itemsize, nodes=NODES,
               local_size=LOCAL, leader_counted=counted,
               formula_flat=NODES * cross_node_bytes(n, itemsize, NODES, LOCAL, hierarchical=False),
               formula_tree=NODES * cross_node_bytes(n, itemsize, NODES, LOCAL, hierarchical=True))


# -- Keras: the same equalities -------------------------------------------------------------------
def keras_train(keras, strategy, steps=10):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((D,), dtype="float64"), keras.layers.Dense(12, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    start = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    agent = hva.KerasAgent(model, strategy=strategy)
    x = np.concatenate([batch(RANK, s)[0] for s in range(steps)])
    y = np.concatenate([batch(RANK, s)[1] for s in range(steps)])
    agent.fit(x, y, batch_size=len(x) // steps, epochs=1, shuffle=False, verbose=0)
    agent.close()
    return np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables]), start


def keras_equalities():
    import keras

    keras.config.set_floatx("float64")
    flat_result, start = keras_train(keras, hva.LocalSGD(period=3))
    versus("keras_localsgd", flat_result, keras_train(keras, hva.LocalSGD(period=3, hierarchical=True))[0], start)
    flat_result, tree_result = (keras_train(keras, hva.DiLoCo(inner_steps=3, outer_lr=0.7, outer_momentum=0.9,
                                                              wire_dtype="float64", hierarchical=tree))[0]
                                for tree in (False, True))
    versus("keras_diloco", flat_result, tree_result, start)


if "--bytes-only" in sys.argv:  # the bytes checks alone (run again under another all-reduce algorithm)
    bytes_checks()
else:
    equalities()
    two_level()
    bytes_checks()
    keras_equalities()
report("done")
