"""After close(), every parameter and every buffer is bit-identical on every rank, for every
strategy; also for a bfloat16 model. Usage: torch_consensus.py STRATEGY DTYPE. RESULT on rank 0."""

import sys

import numpy as np
import torch
from _report import emit

import hvdagents as hva

ctx = hva.init()
name, dtype = sys.argv[1], getattr(torch, sys.argv[2])
strategy = {
    "sync": hva.Sync(),
    "localsgd": hva.LocalSGD(period=3),
    "downpour": hva.Downpour(period=2),
    "easgd": hva.EASGD(alpha=0.3, period=2),
    "gossip": hva.Gossip(period=2),
}[name]

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
).to(dtype)
optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
agent = hva.TorchAgent(model, optimizer, strategy=strategy)
rng = np.random.default_rng(10 + ctx.rank)  # each rank sees other data: its BN statistics differ
x = torch.from_numpy(rng.normal(loc=ctx.rank, size=(16, 6))).to(dtype)
y = x.sum(dim=1, keepdim=True)
losses = []
for _ in range(10):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    agent.step()
    losses.append(ctx.comm.allreduce(loss.item()) / ctx.size)  # the job's mean loss
bn = model[1]
before = ctx.comm.allgather(bn.running_mean.float().numpy().tobytes())
agent.close()


def state_bytes():
    return [t.detach().float().numpy().tobytes() for t in [*model.parameters(), *model.buffers()]]


everything = ctx.comm.allgather(state_bytes())
if ctx.is_root:
    emit({
        "strategy": name,
        "dtype": sys.argv[2],
        "buffers_differed_before_close": len(set(before)) > 1,
        "identical": all(s == everything[0] for s in everything),
        "finite": all(bool(torch.isfinite(t.float()).all()) for t in [*model.parameters(), *model.buffers()]),
        "num_batches_tracked": int(bn.num_batches_tracked),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    })
