"""hva.AsyncDiLoCo on real MPI ranks (3 by default), one job, four checks (RESULT on rank 0):

- ``reference``: ranks take turns (rank r trains one step while the others wait at a barrier),
  so the run is deterministic; the centre after ``close()`` equals a one-process replay of the
  same schedule that keeps N models, N momentum buffers and one centre (float64, 1e-12).
- ``no_lost_push``: ranks train at their own pace (rank 1 slower), every push is recorded on
  the side; the final centre is the start plus the sum of every rank's pushes (float64).
- ``straggler``: rank N-1 sleeps at every step; when the others have done all their steps the
  straggler has done less than half of its own (nobody waited for it).
- ``resume``: in turns, K steps + save, then a new agent from another start + load: the centre
  and every rank's own momentum buffer come back bit for bit, every model is the centre, and
  K more steps + ``close()`` end with every rank identical.

Usage: async_diloco.py DIR
"""

import os
import sys
import time

import numpy as np
import torch
from _report import emit, same_on_every_rank

import hvdagents as hva

ctx = hva.init()
comm, rank, size = ctx.comm, ctx.rank, ctx.size
DIRECTORY = sys.argv[1]
H, LR, MU, STEPS, BATCH = 3, 0.7, 0.9, 12, 8
INNER_LR = 0.05

rng = np.random.default_rng(0)
X = rng.normal(size=(size * STEPS * BATCH, 6))
Y = np.tanh(X @ rng.normal(size=(6, 1))) + 0.05 * rng.normal(size=(len(X), 1))


def batch(r, step):
    """Rank r's batch at its local step ``step`` (0-based): the same on every process."""
    lo = (r * STEPS + step % STEPS) * BATCH
    return torch.from_numpy(X[lo:lo + BATCH]), torch.from_numpy(Y[lo:lo + BATCH])


def make_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def local_step(model, optimizer, r, step, after=None):
    x, y = batch(r, step)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()  # the agent's hook runs the exchange every H steps
    if after is not None:
        after()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def new_agent(strategy, seed=1):
    model = make_model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    return model, optimizer, hva.TorchAgent(model, optimizer, strategy=strategy)


def in_turns(model, optimizer, steps, first=0):
    for step in range(first, first + steps):
        for turn in range(size):
            if turn == rank:
                local_step(model, optimizer, rank, step)
            comm.Barrier()


# -- reference: turns, against a one-process replay ------------------------------------------------
strategy = hva.AsyncDiLoCo(inner_steps=H, outer_lr=LR, outer_momentum=MU, nesterov=True)
model, optimizer, agent = new_agent(strategy)
in_turns(model, optimizer, STEPS + 1)  # 13 steps: close() pushes the last step's pseudo-gradient
for turn in range(size):  # close in turns too: each rank's last push in rank order, as replayed
    if turn == rank:
        agent._runner.exchange.settle(agent)
    comm.Barrier()
agent.close()  # settle again finds nothing moved: no second push
found = flat(model)
identical = same_on_every_rank(comm, found)

if rank == 0:
    models = [make_model() for _ in range(size)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=INNER_LR) for m in models]
    centre = flat(models[0])
    pulled = [centre.copy() for _ in range(size)]
    buffers = [np.zeros_like(centre) for _ in range(size)]

    def set_flat(m, values):
        offset = 0
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.from_numpy(values[offset:offset + p.numel()]).view_as(p))
                offset += p.numel()

    def outer(r):
        global centre
        delta = pulled[r] - flat(models[r])
        buffers[r] = MU * buffers[r] + delta
        centre = centre - LR * (delta + MU * buffers[r]) / size
        pulled[r] = centre.copy()
        set_flat(models[r], centre)

    for step in range(STEPS + 1):
        for r in range(size):
            x, y = batch(r, step)
            optimizers[r].zero_grad()
            torch.nn.functional.mse_loss(models[r](x), y).backward()
            optimizers[r].step()
            if (step + 1) % H == 0:
                outer(r)
    for r in range(size):
        outer(r)
    moved = float(np.abs(centre - flat(make_model())).max())
    emit({"check": "reference", "ranks": size, "max_abs": float(np.abs(found - centre).max()),
          "moved": moved, "identical": identical})

# -- no lost push: free-running ranks, every push recorded ------------------------------------------
model, optimizer, agent = new_agent(hva.AsyncDiLoCo(inner_steps=2, outer_lr=LR, outer_momentum=MU))
start = flat(model)
exchange = agent._runner.exchange
pushed = np.zeros_like(start)
original_push = exchange.store.push


def recording_push(delta):
    global pushed
    pushed = pushed + delta
    original_push(delta)


exchange.store.push = recording_push
for step in range(4 * STEPS):
    local_step(model, optimizer, rank, step, after=(lambda: time.sleep(0.002)) if rank == 1 else None)
agent.close()
total = np.zeros_like(pushed)
comm.Reduce(pushed, total, root=0)
if rank == 0:
    final = flat(model)
    emit({"check": "no_lost_push", "ranks": size, "max_abs": float(np.abs(final - (start + total)).max()),
          "pushes": comm.gather(exchange.outer_steps, root=0), "moved": float(np.abs(final - start).max())})
else:
    comm.gather(exchange.outer_steps, root=0)

# -- straggler: nobody waits for the slow rank -------------------------------------------------------
model, optimizer, agent = new_agent(hva.AsyncDiLoCo(inner_steps=2))
slow = rank == size - 1
steps_done = 0
done_file = os.path.join(DIRECTORY, "fast_done")
comm.Barrier()
for step in range(2 * STEPS):
    local_step(model, optimizer, rank, step, after=(lambda: time.sleep(0.2)) if slow else None)
    steps_done += 1
    if slow and os.path.exists(done_file):
        break  # the fast ranks are done: how far did the straggler get meanwhile?
if rank == 0:
    open(done_file, "w").close()  # rank 0 (fast) has done every step
reached = comm.gather(steps_done, root=0)
agent.close()
if rank == 0:
    emit({"check": "straggler", "ranks": size, "reached": reached, "steps": 2 * STEPS})

# -- resume: the centre and every rank's own momentum buffer come back, bit for bit -------------------
K = 7  # not a multiple of H: the save falls between two outer steps
strategy = hva.AsyncDiLoCo(inner_steps=H, outer_lr=LR, outer_momentum=MU)
model, optimizer, agent = new_agent(strategy)
in_turns(model, optimizer, K)
path = os.path.join(DIRECTORY, "async_diloco.pt")
agent.save_checkpoint(path, step=K)
saved_buffer = agent._runner.exchange.buffer.copy()
saved_rows = agent._runner.snapshot() if rank == 0 else None
moved_buffer = float(np.abs(saved_buffer).max())
comm.Barrier()
agent.close()
model, optimizer, agent = new_agent(strategy, seed=99)  # another start: all must come from the file
extra = agent.load_checkpoint(path)
buffer_back = bool(np.array_equal(agent._runner.exchange.buffer, saved_buffer))
centre = comm.bcast(saved_rows[0] if rank == 0 else None, root=0)
model_is_centre = bool(np.array_equal(flat(model), centre))
rows_back = bool(np.array_equal(agent._runner.snapshot(), saved_rows)) if rank == 0 else None
in_turns(model, optimizer, K, first=K)
agent.close()
identical = same_on_every_rank(comm, flat(model))
checks = comm.gather((buffer_back, model_is_centre, moved_buffer), root=0)
if rank == 0:
    emit({"check": "resume", "ranks": size, "extra": extra, "buffers_back": [c[0] for c in checks],
          "models_are_centre": [c[1] for c in checks], "buffer_moved": [c[2] for c in checks],
          "rows_back": rows_back, "snapshot_rows": int(saved_rows.shape[0]), "identical": identical})
emit({"check": f"done:{rank}"})
