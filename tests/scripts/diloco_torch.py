"""TorchAgent under hva.DiLoCo on 2 ranks, every check in one job (RESULT lines on rank 0).

Equivalences (float64): DiLoCo(1, lr 1, momentum 0) and Sync with plain SGD; DiLoCo(H, 1, 0) and
LocalSGD(H), also with frozen layers, buffers and uneven data. References: the outer Nesterov
step and the streaming schedule against tests/scripts/_diloco_reference.py. Then checkpoints,
the wire dtype's error, a bfloat16 model and digits."""

import os
import tempfile

import numpy as np
import torch
from _diloco_reference import D, regression_batches, simulate
from _report import emit, same_on_every_rank

import hvdagents as hva

ctx = hva.init()
comm = ctx.comm
RANK, SIZE = ctx.rank, ctx.size
batch = regression_batches(SIZE)


def report(check, **values):
    if RANK == 0:
        emit({"check": check, **values})


def identical(*arrays):
    return same_on_every_rank(comm, *(np.asarray(a) for a in arrays))


def flat(model):
    return torch.cat([t.detach().reshape(-1).double() for t in [*model.parameters(), *model.buffers()]
                      if t.is_floating_point()]).numpy()


def mlp(seed, norm=False, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(D, 12), *( [torch.nn.BatchNorm1d(12)] if norm else []), torch.nn.Tanh(),
              torch.nn.Linear(12, 1)]
    return torch.nn.Sequential(*layers).to(dtype)


def linear(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 1).double()


def train(strategy, model, steps, lr=0.05, momentum=0.0, freeze_at=None, first=0, agent=None, keep_open=False):
    """``steps`` local steps on this rank's batches ``first``, ``first + 1``, ...; close()."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    agent = agent or hva.TorchAgent(model, optimizer, strategy=strategy)
    for s in range(first, first + steps):
        if freeze_at is not None and s == freeze_at:
            for p in model[0].parameters():
                p.requires_grad_(False)
        x, y = (torch.from_numpy(a).to(next(model.parameters()).dtype) for a in batch(RANK, s))
        agent.optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        agent.optimizer.step()
    if not keep_open:
        agent.close()
    return agent


def diloco(H, lr=1.0, mu=0.0, **kw):
    return hva.DiLoCo(inner_steps=H, outer_lr=lr, outer_momentum=mu, wire_dtype=kw.pop("wire_dtype", "float64"), **kw)


def compare(check, a_model, b_model, start, **extra):
    """``a_model`` and ``b_model`` after close(): their largest difference, how far training moved
    them from ``start``, and whether the ranks hold the same bits."""
    a, b = flat(a_model), flat(b_model)
    report(check, max_diff=float(np.max(np.abs(a - b))), moved=float(np.max(np.abs(a - start))),
           identical=identical(b), **extra)


# -- equivalences --------------------------------------------------------------------------------
m_sync, m_diloco = mlp(1), mlp(1)
train(hva.Sync(), m_sync, 7, lr=0.1)
train(diloco(1), m_diloco, 7, lr=0.1)
compare("equals_sync", m_sync, m_diloco, flat(mlp(1)))

m_local, m_diloco = mlp(1), mlp(1)
train(hva.LocalSGD(period=3), m_local, 10, momentum=0.9)
train(diloco(3), m_diloco, 10, momentum=0.9)
compare("equals_localsgd", m_local, m_diloco, flat(mlp(1)))

m_local, m_diloco = mlp(1, norm=True), mlp(1, norm=True)
for p in m_local[-1].parameters():
    p.requires_grad_(False)
for p in m_diloco[-1].parameters():
    p.requires_grad_(False)
head = torch.cat([p.detach().reshape(-1) for p in m_diloco[-1].parameters()]).numpy().copy()
train(hva.LocalSGD(period=3), m_local, 10, momentum=0.9, freeze_at=5)
train(diloco(3), m_diloco, 10, momentum=0.9, freeze_at=5)
frozen_after = torch.cat([p.detach().reshape(-1) for p in m_diloco[-1].parameters()]).numpy()
compare("frozen_and_buffers", m_local, m_diloco, flat(mlp(1, norm=True)),
        head_moved=float(np.max(np.abs(frozen_after - head))),
        buffers_moved=float(np.max(np.abs(m_diloco[1].running_mean.numpy()))))

m_local, m_diloco = mlp(1), mlp(1)
steps = 10 if RANK == 0 else 7
train(hva.LocalSGD(period=3), m_local, steps, momentum=0.9)
a = train(diloco(3), m_diloco, steps, momentum=0.9)
compare("uneven", m_local, m_diloco, flat(mlp(1)), step=a.runner_state.step)

# -- the outer Nesterov step: 5 rounds against the reference ---------------------------------------
H, ROUNDS = 3, 5
model = linear(2)
theta0 = flat(model)
agent = train(diloco(H, 0.7, 0.9, nesterov=True), model, H * ROUNDS, keep_open=True)
runner = agent._runner
want, velocity, _ = simulate(batch, SIZE, theta0, H * ROUNDS, H, 1, 0, 0.05, 0.7, 0.9, True)
before_close = flat(model)
momentum_same = identical(runner.momentum, runner.theta_global)
agent.close()
report("nesterov", max_diff=float(np.max(np.abs(flat(model) - want))),
       momentum_diff=float(np.max(np.abs(runner.momentum - velocity))),
       moved=float(np.max(np.abs(want - theta0))), momentum_same=momentum_same,
       plain_sgd_diff=float(np.max(np.abs(want - simulate(batch, SIZE, theta0, H * ROUNDS, H, 1, 0, 0.05, 0.7, 0.9,
                                                          False)[0]))),
       close_is_global=bool(np.array_equal(flat(model), runner.theta_global)), identical=identical(flat(model)),
       unchanged_by_close=bool(np.array_equal(before_close, flat(model))))

# -- streaming: P fragments, overlapped ----------------------------------------------------------
for P, H, OVERLAP, STEPS in [(2, 4, 1, 12), (3, 6, 1, 16), (2, 4, 0, 8)]:
    model = linear(3)
    theta0 = flat(model)
    agent = train(diloco(H, 0.7, 0.9, fragments=P, overlap=OVERLAP), model, STEPS, keep_open=True)
    in_flight_log = list(agent._runner.sync_log)
    agent.close()
    want, velocity, log = simulate(batch, SIZE, theta0, STEPS, H, P, OVERLAP, 0.05, 0.7, 0.9, True)
    first_window = [k for k, sent, _ in log if sent <= H]
    report(f"streaming_P{P}_H{H}_tau{OVERLAP}", max_diff=float(np.max(np.abs(flat(model) - want))),
           momentum_diff=float(np.max(np.abs(agent._runner.momentum - velocity))),
           log=[list(e) for e in agent._runner.sync_log], reference_log=[list(e) for e in log],
           during_training=[list(e) for e in in_flight_log], first_window=first_window,
           identical=identical(flat(model)))

# -- checkpoints: the outer state saved and resumed exactly --------------------------------------
path = os.path.join(tempfile.gettempdir(), f"diloco_torch_{os.environ.get('OMPI_COMM_WORLD_JOBID', 'job')}.pt")
path = comm.bcast(path)
model = mlp(4)
agent = train(diloco(3, 0.7, 0.9), model, 6, lr=0.1, keep_open=True)
agent.save_checkpoint(path, epoch=2)
saved_momentum = agent._runner.momentum.copy()
train(None, model, 6, lr=0.1, first=6, agent=agent, keep_open=True)
straight = flat(model)
straight_momentum = agent._runner.momentum.copy()
agent.close()
model_b = mlp(5)
optimizer_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
agent_b = hva.TorchAgent(model_b, optimizer_b, strategy=diloco(3, 0.7, 0.9))
extra = agent_b.load_checkpoint(path)
loaded_momentum = agent_b._runner.momentum.copy()
train(None, model_b, 6, lr=0.1, first=6, agent=agent_b, keep_open=True)
resumed = flat(model_b)
report("checkpoint", epoch=extra["epoch"], rank_bitwise=comm.allgather(bool(np.array_equal(straight, resumed))),
       momentum_bitwise=comm.allgather(bool(np.array_equal(straight_momentum, agent_b._runner.momentum))),
       loaded_momentum_bitwise=comm.allgather(bool(np.array_equal(saved_momentum, loaded_momentum))),
       momentum_nonzero=float(np.max(np.abs(saved_momentum))), step=agent_b.runner_state.step)
agent_b.close()
if RANK == 0:
    os.unlink(path)

# -- the wire dtype's error ------------------------------------------------------------------------
H = 3
plain = mlp(6)
opt = torch.optim.SGD(plain.parameters(), lr=0.1)
theta0 = torch.cat([p.detach().reshape(-1) for p in plain.parameters()]).numpy().copy()
for s in range(H):  # this rank's local steps without any agent: its pseudo-gradient by hand
    x, y = (torch.from_numpy(a) for a in batch(RANK, s))
    opt.zero_grad()
    torch.nn.functional.mse_loss(plain(x), y).backward()
    opt.step()
deltas = comm.allgather(theta0 - torch.cat([p.detach().reshape(-1) for p in plain.parameters()]).numpy())
largest = np.max(np.abs(deltas), axis=0)
globals_by_wire = {}
for wire in ("float64", "float32", "float16"):
    agent = train(diloco(H, 0.7, 0.9, wire_dtype=wire), mlp(6), H, lr=0.1, keep_open=True)
    globals_by_wire[wire] = agent._runner.theta_global.copy()
    agent.close()
for wire, u in (("float32", 2.0**-24), ("float16", 2.0**-11)):
    err = np.abs(globals_by_wire[wire] - globals_by_wire["float64"])
    bound = 0.7 * 1.9 * (SIZE * u * largest + SIZE * 2.0**-24)
    report(f"wire_{wire}", within=bool(np.all(err <= bound)), worst_ratio=float(np.max(err / bound)),
           max_err=float(np.max(err)))

# -- a bfloat16 model --------------------------------------------------------------------------
model = mlp(7, dtype=torch.bfloat16)
losses = []
agent = hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.05), strategy=hva.DiLoCo(inner_steps=2))
for s in range(24):
    x, y = (torch.from_numpy(a).to(torch.bfloat16) for a in batch(RANK, s % 4))
    agent.optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    agent.optimizer.step()
    losses.append(float(loss.detach()))
agent.close()
params = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).numpy()
report("bf16", first=float(np.mean(losses[:4])), last=float(np.mean(losses[-4:])), identical=identical(params),
       dtypes=sorted({str(p.dtype) for p in model.parameters()}),
       close_is_global=bool(np.array_equal(params, torch.from_numpy(agent._runner.theta_global.astype(np.float32))
                                           .to(torch.bfloat16).float().numpy())))

# -- digits, the bar the other strategies meet ------------------------------------------------------
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.2, random_state=0)
mine = np.asarray(hva.shard(len(x_train)))
xs, ys = torch.tensor(x_train[mine], dtype=torch.float32), torch.tensor(y_train[mine])
for name, strategy in (("digits", hva.DiLoCo(inner_steps=8)),
                       ("digits_streaming", hva.DiLoCo(inner_steps=8, fragments=2, overlap=1))):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    agent = hva.TorchAgent(net, torch.optim.AdamW(net.parameters(), lr=0.001), strategy=strategy)  # the paper's inner
    steps = 0
    for epoch in range(12):
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(xs) // 32):
            idx = order[i * 32:(i + 1) * 32]
            agent.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            agent.optimizer.step()
            steps += 1
    agent.close()
    with torch.no_grad():
        accuracy = float((net(torch.tensor(x_test, dtype=torch.float32)).argmax(1).numpy() == y_test).mean())
    report(name, accuracy=accuracy, steps=steps, exchanges=len(agent._runner.sync_log),
           identical=identical(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()))
report("done")
