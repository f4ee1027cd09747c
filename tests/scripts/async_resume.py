"""Resume of an asynchronous agent, 2 ranks: the centre after resume equals the centre saved,
and 2 epochs + resume + 1 epoch ends where 3 straight epochs do. Usage: async_resume.py
STRATEGY DIR. RESULT on rank 0."""

import sys

import numpy as np
import torch
from _report import emit

import hvdagents as hva

ctx = hva.init()
name, directory = sys.argv[1], sys.argv[2]
STRATEGIES = {"downpour": lambda: hva.Downpour(period=2), "easgd": lambda: hva.EASGD(alpha=0.3, period=2),
              "gossip": lambda: hva.Gossip(period=2)}
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(256, 8)))
Y = X @ torch.from_numpy(rng.normal(size=(8, 1))) + 0.1 * torch.from_numpy(rng.normal(size=(256, 1)))
x, y = hva.shard(X), hva.shard(Y)


def agent_for(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    return model, optimizer, hva.TorchAgent(model, optimizer, strategy=STRATEGIES[name]())


def epoch(model, optimizer, agent):
    for i in range(0, len(x), 8):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[i:i + 8]), y[i:i + 8]).backward()
        agent.step()


def full_loss(model):
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(X), Y))


def run(epochs, seed=1):
    model, optimizer, agent = agent_for(seed)
    for _ in range(epochs):
        epoch(model, optimizer, agent)
    return model, optimizer, agent


model, optimizer, agent = run(3)
agent.close()
straight = full_loss(model)
model, optimizer, agent = run(1)
agent.close()
one_epoch = full_loss(model)

model, optimizer, agent = run(2)
path = f"{directory}/async.pt"
agent.save_checkpoint(path, epoch=2)
ctx.comm.Barrier()
saved_centre = torch.load(path, weights_only=False)["strategy_shared"] if ctx.is_root else None
agent.close()
model, optimizer, agent = agent_for(seed=99)  # another start: all must come from the checkpoint
extra = agent.load_checkpoint(path)
resumed_centre = agent._runner.snapshot() if ctx.is_root else None
epoch(model, optimizer, agent)
agent.close()
if ctx.is_root:
    emit({"strategy": name, "epoch": extra["epoch"], "straight": straight, "one_epoch": one_epoch,
          "resumed": full_loss(model),
          "centre_equal": None if saved_centre is None else bool(np.array_equal(saved_centre, resumed_centre))})
