"""Sync-training checks for TorchAgent, run under mpirun -np 2. Prints RESULT lines on rank 0."""

import copy
import json
import tempfile

import numpy as np
import torch

import hvdagents as hva

ctx = hva.init()
hvd = __import__("horovod.torch", fromlist=["x"])
STEPS, BATCH, LR = 6, 16, 0.1
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 10)))
Y = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 1)))


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def report(name, **values):
    if ctx.is_root:
        print("RESULT " + json.dumps({"check": name, **values}), flush=True)


def train(agent, model, optimizer, steps=STEPS):
    for s in range(steps):
        xb, yb = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
        mine = hva.shard(np.arange(BATCH))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(xb[mine]), yb[mine]).backward()
        agent.step()


# 1. ranks seeded differently start from rank 0's weights
model = make_model(seed=100 + ctx.rank)
rank0_initial = copy.deepcopy(make_model(seed=100))
initial_flat = flat(rank0_initial)
optimizer = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())
report("starts_from_rank0", equal=bool(np.array_equal(flat(model), flat(rank0_initial))))

# 2. equivalence with one process on the full batches (float64, plain SGD)
train(agent, model, optimizer)
reference = rank0_initial
ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
for s in range(STEPS):
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(reference(X[s * BATCH:(s + 1) * BATCH]), Y[s * BATCH:(s + 1) * BATCH]).backward()
    ref_opt.step()
ours, theirs = flat(model), flat(reference)
report("equivalence", max_rel=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))),
       moved=float(np.max(np.abs(theirs - initial_flat))))

# 3. bit-identical on every rank after k sync steps
gathered = hvd.allgather_object(ours.tobytes())
report("identical", identical=all(g == gathered[0] for g in gathered), ranks=len(gathered))
sync_params = ours

# 4. LocalSGD(period=1) with plain SGD == Sync
model2 = make_model(seed=100 + ctx.rank)
optimizer2 = torch.optim.SGD(model2.parameters(), lr=LR)
agent2 = hva.TorchAgent(model2, optimizer2, strategy=hva.LocalSGD(period=1))
train(agent2, model2, optimizer2)
agent2.close()
report("localsgd_equals_sync", max_abs=float(np.max(np.abs(flat(model2) - sync_params))))

# 5. checkpoint after 2 "epochs", resume for 1 more == 3 straight (momentum: optimizer state matters)
def fresh(seed):
    m = make_model(seed)
    o = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
    return m, o, hva.TorchAgent(m, o, strategy=hva.Sync())


def epochs(agent, model, optimizer, n):
    for _ in range(n):
        train(agent, model, optimizer, steps=STEPS)


m3, o3, a3 = fresh(7)
epochs(a3, m3, o3, 3)
with tempfile.TemporaryDirectory() as tmp:
    path = hvd.broadcast_object(tmp, root_rank=0) + "/ckpt.pt"
    m4, o4, a4 = fresh(7)
    epochs(a4, m4, o4, 2)
    a4.save_checkpoint(path, epoch=2)
    hvd.allreduce(torch.zeros(1), name="barrier")  # rank 0 has written before anyone reads
    m5, o5, a5 = fresh(99)  # a different start: everything must come from the checkpoint
    extra = a5.load_checkpoint(path)
    epochs(a5, m5, o5, 1)
report("resume", bitwise=bool(np.array_equal(flat(m5), flat(m3))), epoch=extra.get("epoch"))

# 6. fp16 compression is really applied: close to Sync, but not bit-equal
model6 = make_model(seed=100 + ctx.rank)
optimizer6 = torch.optim.SGD(model6.parameters(), lr=LR)
agent6 = hva.TorchAgent(model6, optimizer6, strategy=hva.Sync(compression="fp16"))
train(agent6, model6, optimizer6)
report("fp16", max_abs=float(np.max(np.abs(flat(model6) - sync_params))))

# 7. backward_passes_per_step=2: two half-batch passes then one step == one full-batch step
model7 = make_model(seed=100 + ctx.rank)
optimizer7 = torch.optim.SGD(model7.parameters(), lr=LR)
agent7 = hva.TorchAgent(model7, optimizer7, strategy=hva.Sync(backward_passes_per_step=2))
for s in range(STEPS):
    xb, yb = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
    mine = hva.shard(np.arange(BATCH))
    optimizer7.zero_grad()
    for half in (mine[: len(mine) // 2], mine[len(mine) // 2:]):
        (torch.nn.functional.mse_loss(model7(xb[half]), yb[half]) / 2).backward()
    agent7.step()
report("backward_passes", max_rel=float(np.max(np.abs(flat(model7) - sync_params)) / np.max(np.abs(sync_params))))

# 8. zero_grad() between backward() and step(): the averaging ended with backward, so nothing is
#    in flight; the step then has no gradients and changes nothing, as in one process.
model8 = make_model(seed=1)
optimizer8 = torch.optim.SGD(model8.parameters(), lr=LR)
agent8 = hva.TorchAgent(model8, optimizer8, strategy=hva.Sync())
before8 = flat(model8)
torch.nn.functional.mse_loss(model8(X[:4]), Y[:4]).backward()
optimizer8.zero_grad()
try:
    agent8.step()
    message = "no error"
except hva.UsageError as err:
    message = str(err)
report("zero_grad_before_step", message=message, unchanged=bool(np.array_equal(before8, flat(model8))))
