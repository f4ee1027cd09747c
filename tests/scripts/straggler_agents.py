"""The last rank sleeps every step; each rank trains for a fixed wall-time budget on its own
clock, with no collective of the script's own (so any lock-step comes from the library; a
rank that stops early under Sync closes, and Horovod's join serves the others). Prints the
steps each rank completed (rank 0)."""

import sys
import time

import numpy as np
import torch
from _report import emit

import hvdagents as hva

strategy_name, budget, delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ctx = hva.init()
strategy = {"sync": hva.Sync(), "downpour": hva.Downpour(period=1), "easgd": hva.EASGD(alpha=0.3, period=1),
            "gossip": hva.Gossip(period=1)}[strategy_name]
torch.manual_seed(0)
model = torch.nn.Linear(16, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
agent = hva.TorchAgent(model, optimizer, strategy=strategy)
x, y = torch.randn(32, 16), torch.randn(32, 1)
slow = ctx.rank == ctx.size - 1
ctx.comm.barrier()
start = time.monotonic()
steps = 0
while True:
    if time.monotonic() - start > budget:
        break
    if slow:
        time.sleep(delay)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    agent.step()
    steps += 1
agent.close()
counts = ctx.comm.gather(steps, root=0)
identical = ctx.comm.gather(agent.flat_parameters().tobytes(), root=0)
if ctx.is_root:
    emit({"strategy": strategy_name, "steps": counts, "identical": len(set(identical)) == 1,
          "finite": bool(np.all(np.isfinite(agent.flat_parameters()))),
          "horovod_started": "horovod.torch" in sys.modules and sys.modules["horovod.torch"].is_initialized()})
