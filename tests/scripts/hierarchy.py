"""The node-leader hierarchy on 2 simulated hosts x 2 ranks, every check in one job (RESULT lines
on rank 0): LocalSGD and DiLoCo with hierarchical=True against the flat versions (float64, torch
and Keras), LocalSGD's two-level period step by step, and the bytes that leave each host per
exchange, flat and hierarchical (each host's link counter, read inside the host); Downpour, EASGD
and AsyncDiLoCo with hierarchical=True against a replay of the node-leader rule, their pushes
counted under free-running, uneven ranks, and their bytes across the hosts.
``--bytes-only``: the bytes checks alone (run again under another MPI all-reduce algorithm);
``--centre-only``: the checks of Downpour, EASGD and AsyncDiLoCo with ``hierarchical=True`` alone
(their checkpoint resume and their KerasAgent runs included)."""

import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import torch
from _diloco_reference import D, linear_gradient, regression_batches
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


def wide_agent(strategy):
    """The wide float64 model under ``strategy`` (same start on every rank, this rank's own
    data), and one training step of it."""
    torch.manual_seed(3)
    model = torch.nn.Linear(WIDE, WIDE).double()
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.01), strategy=strategy)
    x = torch.randn(4, WIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(RANK))

    def step():
        agent.optimizer.zero_grad()
        model(x).square().mean().backward()
        agent.optimizer.step()

    return agent, step


def wide_step_bytes(strategy):
    agent, step = wide_agent(strategy)

    def counter():
        summer = agent._runner._summer
        return summer.hierarchy.sent_across_nodes if summer is not None else 0

    step()  # the first exchange (Horovod's and MPI's connections are made)
    before = counter()
    measured = [across_hosts(step) for _ in range(2)]
    counted = (counter() - before) // 2  # per exchange
    agent.close()
    n = sum(p.numel() for p in agent.model.parameters())
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


# -- the centre strategies, hierarchical: Downpour, EASGD, AsyncDiLoCo ------------------------------
NODE = sorted(set(HOSTS), key=HOSTS.index).index(HOST)  # hosts numbered by their first rank
NODE_RANKS = [[r for r in range(SIZE) if HOSTS[r] == h] for h in sorted(set(HOSTS), key=HOSTS.index)]
CENTRE_LR, CENTRE_STEPS, CENTRE_PERIOD = 0.05, 10, 3
ALPHA, OUTER_LR, MU = 0.2, 0.7, 0.9


def centre_strategy(kind, period=CENTRE_PERIOD, **kw):
    if kind == "downpour":
        return hva.Downpour(period=period, hierarchical=True, **kw)
    if kind == "easgd":
        return hva.EASGD(alpha=ALPHA, period=period, hierarchical=True, **kw)
    return hva.AsyncDiLoCo(inner_steps=period, outer_lr=OUTER_LR, outer_momentum=MU, hierarchical=True, **kw)


def centre_reference(kind, theta0, steps=CENTRE_STEPS, resume_at=None):
    """A NumPy replay of the node-leader rule (written from the rule, not with the library):
    every rank steps plain SGD on a linear model; after every ``CENTRE_PERIOD`` steps node 0,
    then node 1 exchange (the nodes take turns, as the job does): their ranks' contributions are
    summed and added to the centre once, and (Downpour, AsyncDiLoCo) every rank of the node
    continues from the new centre. At the end every rank's last contribution (EASGD: none).
    ``resume_at``: after that many steps, a checkpoint's resume as documented: every rank
    continues from the centre (EASGD: from rank 0's model), each keeps its own momentum buffer
    (AsyncDiLoCo), the step count goes on (the same exchange steps)."""
    c = theta0.copy()
    x = [theta0.copy() for _ in range(SIZE)]
    pulled = [theta0.copy() for _ in range(SIZE)]
    b = [np.zeros_like(theta0) for _ in range(SIZE)]

    def contribution(r):
        if kind == "downpour":
            return (x[r] - pulled[r]) / CENTRE_PERIOD
        delta = pulled[r] - x[r]
        b[r] = MU * b[r] + delta
        return -OUTER_LR * (delta + MU * b[r]) / SIZE

    for step in range(steps):
        if step == resume_at:
            x = [(x[0] if kind == "easgd" else c).copy() for _ in range(SIZE)]
            pulled = [c.copy() for _ in range(SIZE)]
        for ranks in NODE_RANKS:
            for r in ranks:
                xb, yb = batch(r, step)
                x[r] = x[r] - CENTRE_LR * linear_gradient(x[r], xb, yb)
            if (step + 1) % CENTRE_PERIOD:
                continue
            if kind == "easgd":
                elastic = [ALPHA * (x[r] - c) for r in ranks]
                for r, e in zip(ranks, elastic):
                    x[r] = x[r] - e
                c = c + sum(elastic)
            else:
                c = c + sum(contribution(r) for r in ranks)
                for r in ranks:
                    x[r], pulled[r] = c.copy(), c.copy()
    if kind != "easgd":
        c = c + sum(contribution(r) for r in range(SIZE) if not np.array_equal(x[r], pulled[r]))
    return c


def linear_model(seed=4):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1).double()  # flat: [w, b], the reference's theta


def in_turns(model, agent, first, count):
    """Steps ``first`` to ``first + count - 1``, the nodes taking turns at every step (the ranks
    of a node train together): deterministic."""
    for s in range(first, first + count):
        for turn in range(NODES):
            if turn == NODE:
                sgd_step(model, agent.optimizer, s)
            comm.Barrier()


def centre_against_reference(kind):
    """The ranks of a node train together, the nodes take turns at every step (deterministic);
    ``close()`` on every rank at once (its last pushes are sums: the order only rounds)."""
    model = linear_model()
    theta0 = flat(model)
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=CENTRE_LR), strategy=centre_strategy(kind))
    in_turns(model, agent, 0, CENTRE_STEPS)
    agent.close()
    found = flat(model)
    expected = centre_reference(kind, theta0)
    report(f"centre_{kind}", rel_diff=float(np.max(np.abs(found - expected)) / np.max(np.abs(expected))),
           moved=float(np.max(np.abs(found - theta0))), identical=same_on_every_rank(comm, found))


class PushRecorder:
    """Records on the side every contribution this rank gives its node (``NodeCentre.push``)
    and every push its leader makes into the centre (the store's ``push``)."""

    def __init__(self, agent, n):
        runner = agent._runner
        self.exchange = getattr(runner, "inner", runner).exchange
        self.given, self.pushed, self.counts = np.zeros(n), np.zeros(n), [0, 0]
        node_push, store = self.exchange.node.push, self.exchange.store

        def recording_node_push(contribution, **options):
            if contribution is not None:
                self.given = self.given + contribution
                self.counts[0] += 1
            return node_push(contribution, **options)

        self.exchange.node.push = recording_node_push
        if store is not None:
            store_push = store.push

            def recording_store_push(delta):
                self.pushed = self.pushed + delta
                self.counts[1] += 1
                store_push(delta)

            store.push = recording_store_push

    def report(self, check, start, final):
        """Collective: the final centre against the start plus every leader's push, those pushes
        against every rank's contribution, the counts per rank, whether the ranks agree."""
        total_given, total_pushed = np.zeros_like(start), np.zeros_like(start)
        comm.Reduce(self.given, total_given, root=0)
        comm.Reduce(self.pushed, total_pushed, root=0)
        counts = comm.gather([*self.counts, int(self.exchange.node.is_leader)], root=0)
        scale = np.max(np.abs(final - start))
        report(check, moved=float(scale), counts=counts, identical=same_on_every_rank(comm, final),
               pushes_vs_centre=float(np.max(np.abs(start + total_pushed - final)) / scale),
               given_vs_pushed=float(np.max(np.abs(total_given - total_pushed)) / scale))


def centre_no_lost_push(kind, **kw):
    """Ranks at their own pace (rank 1 slower), the last rank stopping after 11 steps of 16 (its
    node's other rank exchanges on with it); every rank's contribution and every leader's push
    recorded: the final centre is the start plus the leaders' pushes, which add up to the ranks'
    contributions (no contribution lost inside a node, no push lost in the centre)."""
    model = mlp(5)
    agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.05), strategy=centre_strategy(kind, 2, **kw))
    start = flat(model)
    recorder = PushRecorder(agent, start.size)
    steps = 11 if RANK == SIZE - 1 else 16
    for s in range(steps):
        sgd_step(model, agent.optimizer, s % 10)
        if RANK == 1:
            time.sleep(0.002)
    agent.close()
    recorder.report(f"centre_free_{kind}" + ("_bounded" if kw else ""), start, flat(model))


def keras_centre_no_lost_push(kind):
    """KerasAgent (float64) with a hierarchical centre, period 2: ``agent.fit`` at every rank's own
    pace, the last rank on 11 batches, the others on 14; recorded as :func:`centre_no_lost_push`."""
    import keras

    keras.config.set_floatx("float64")
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((D,), dtype="float64"), keras.layers.Dense(12, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    agent = hva.KerasAgent(model, strategy=centre_strategy(kind, 2))
    start = agent.flat_parameters()
    recorder = PushRecorder(agent, start.size)
    steps = 11 if RANK == SIZE - 1 else 14
    x, y = (np.concatenate([batch(RANK, s)[i] for s in range(steps)]) for i in (0, 1))
    agent.fit(x, y, batch_size=len(x) // steps, epochs=1, shuffle=False, verbose=0)
    agent.close()
    recorder.report(f"centre_free_keras_{kind}", start, agent.flat_parameters())


# -- the centre strategies, hierarchical: a checkpoint and its resume -------------------------------
RESUME_K = 5  # steps before the save (not a multiple of the period: it falls between two exchanges) and after


def centre_resume(kind, directory):
    """Linear model, plain SGD, the hosts taking turns: ``RESUME_K`` steps, ``save_checkpoint``;
    then (the run that goes on) the same agent loads it in place, and (the resumed run) a new
    agent from another seed loads it; each ``RESUME_K`` more steps and ``close()``. Bit for bit
    after the new agent's load: the centre and (AsyncDiLoCo) every momentum row, as rank 0's
    snapshot reads them, every rank's model (the centre; EASGD: rank 0's saved model), every
    rank's own buffer, the step count; after the 5 more steps (before ``close()``) every rank's
    model against the run that went on; after ``close()`` (1e-12: both hosts push their last
    change at once, and the order of two float sums rounds) against the run that went on and
    the replay with the resume (``centre_reference``)."""
    def new_agent(seed):
        model = linear_model(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=CENTRE_LR)
        return model, hva.TorchAgent(model, optimizer, strategy=centre_strategy(kind))

    model, agent = new_agent(4)
    theta0 = flat(model)
    in_turns(model, agent, 0, RESUME_K)
    path = os.path.join(directory, f"{kind}.pt")
    agent.save_checkpoint(path, step=RESUME_K)
    saved_shared = agent._runner.snapshot() if RANK == 0 else None  # nothing moved since the save
    saved_model0 = comm.bcast(flat(model) if RANK == 0 else None, root=0)
    saved_buffer = agent._runner.exchange.buffer.copy() if kind == "asyncdiloco" else np.zeros(1)
    agent.load_checkpoint(path)  # the run that goes on, from its checkpoint
    in_turns(model, agent, RESUME_K, RESUME_K)
    went_on_before = flat(model)
    agent.close()
    went_on = flat(model)

    model, agent = new_agent(9)  # another start: everything must come from the file
    extra = agent.load_checkpoint(path)
    shared_back = bool(np.array_equal(agent._runner.snapshot(), saved_shared)) if RANK == 0 else None
    centre = comm.bcast(None if RANK else saved_shared[0] if kind == "asyncdiloco" else saved_shared, root=0)
    model_back = bool(np.array_equal(flat(model), saved_model0 if kind == "easgd" else centre))
    buffer_back = bool(np.array_equal(agent._runner.exchange.buffer, saved_buffer)) if kind == "asyncdiloco" \
        else None
    step_back = agent.runner_state.step == RESUME_K
    in_turns(model, agent, RESUME_K, RESUME_K)
    before_close = flat(model)
    agent.close()
    resumed = flat(model)
    expected = centre_reference(kind, theta0, 2 * RESUME_K, resume_at=RESUME_K)
    identical = same_on_every_rank(comm, resumed)
    per_rank = comm.gather([model_back, buffer_back, step_back, bool(np.array_equal(before_close, went_on_before)),
                            float(np.max(np.abs(saved_buffer)))], root=0)
    if RANK == 0:
        report(f"centre_resume_{kind}", extra=extra, shared_back=shared_back, identical=identical,
               models_back=[p[0] for p in per_rank], buffers_back=[p[1] for p in per_rank],
               steps_back=[p[2] for p in per_rank], as_went_on=[p[3] for p in per_rank],
               buffer_moved=min(p[4] for p in per_rank), centre_moved=float(np.max(np.abs(centre - theta0))),
               closed_diff=float(np.max(np.abs(resumed - went_on)) / np.max(np.abs(went_on))),
               replay_diff=float(np.max(np.abs(resumed - expected)) / np.max(np.abs(expected))))


def centre_step_bytes(strategy):
    """Bytes across the hosts while every rank makes one step (one exchange) of the wide model."""
    agent, step = wide_agent(strategy)

    step()  # the first exchange (the relay's connections are made)
    sent = min(across_hosts(step) for _ in range(2))
    agent.close()
    return sent


def centre_bytes(kind):
    """Bytes across the hosts while every rank makes one exchange of the 1,049,600-parameter
    float64 model, flat and hierarchical (one push and one pull of the centre per rank, or per
    node)."""
    make = {"downpour": lambda tree: hva.Downpour(period=1, hierarchical=tree),
            "easgd": lambda tree: hva.EASGD(alpha=ALPHA, period=1, hierarchical=tree),
            "asyncdiloco": lambda tree: hva.AsyncDiLoCo(inner_steps=1, hierarchical=tree)}[kind]
    flat_bytes, tree_bytes = (centre_step_bytes(make(tree)) for tree in (False, True))
    n = WIDE * WIDE + WIDE
    report(f"centre_bytes_{kind}", flat=flat_bytes, tree=tree_bytes, elements=n, itemsize=8, nodes=NODES,
           local_size=LOCAL, formula_flat=NODES * cross_node_bytes(n, 8, NODES, LOCAL, hierarchical=False),
           formula_tree=NODES * cross_node_bytes(n, 8, NODES, LOCAL, hierarchical=True))


def centre_checks():
    for kind in ("downpour", "easgd", "asyncdiloco"):
        centre_against_reference(kind)
        centre_no_lost_push(kind)
        centre_bytes(kind)
    centre_no_lost_push("downpour", staleness_aware=True, max_staleness=3)
    directory = comm.bcast(tempfile.mkdtemp(prefix="hva-hierarchy-") if RANK == 0 else None, root=0)
    for kind in ("downpour", "easgd", "asyncdiloco"):
        centre_resume(kind, directory)
    comm.Barrier()
    if RANK == 0:
        shutil.rmtree(directory, ignore_errors=True)
    for kind in ("downpour", "easgd", "asyncdiloco"):
        keras_centre_no_lost_push(kind)


if "--bytes-only" in sys.argv:  # the bytes checks alone (run again under another all-reduce algorithm)
    bytes_checks()
elif "--centre-only" in sys.argv:  # the centre strategies' checks alone (to work on them)
    centre_checks()
else:
    equalities()
    two_level()
    bytes_checks()
    keras_equalities()
    centre_checks()
report("done")
