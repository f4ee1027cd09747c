"""A rank slowed x3 by compute: for each strategy named (comma-separated), ``budget`` seconds
with the last rank doing every step's forward and backward three times (twice more on a twin
of the model, outside the agent: three times the compute, no sleep). Each rank trains a fresh agent per
strategy and stops on its own clock, with no collective of the script's own (under Sync any
lock-step comes from the library). Rank 0 prints the steps per rank, one line per strategy.
"""

import copy
import sys
import time

import numpy as np
import torch
from _report import emit

import hvdagents as hva

strategy_names, budget = sys.argv[1].split(","), float(sys.argv[2])
ctx = hva.init()
torch.set_num_threads(1)
BATCH = int(sys.argv[3]) if len(sys.argv) > 3 else 1024


def strategy(strategy_name: str):
    return {"sync": hva.Sync(), "downpour": hva.Downpour(period=1), "easgd": hva.EASGD(alpha=0.3, period=1),
            "gossip": hva.Gossip(period=1)}[strategy_name]


def phase(strategy_name: str) -> tuple[int, bytes]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    chosen = strategy(strategy_name)
    agent = hva.TorchAgent(model, optimizer, strategy=chosen)
    x, y = torch.randn(BATCH, 64), torch.randint(0, 10, (BATCH,))
    twin = copy.deepcopy(model) if ctx.rank == ctx.size - 1 else None
    ctx.comm.Barrier()
    start, steps = time.monotonic(), 0
    while time.monotonic() - start <= budget:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if twin is not None:
            for _ in range(2):
                torch.nn.functional.cross_entropy(twin(x), y).backward()
        agent.step()
        steps += 1
    agent.close()
    return steps, agent.flat_parameters().tobytes()


for name in strategy_names:
    steps, params = phase(name)
    counts = ctx.comm.gather(steps, root=0)
    finals = ctx.comm.gather(params, root=0)
    if ctx.is_root:
        emit({"strategy": name, "straggler": counts, "identical": len(set(finals)) == 1,
              "finite": bool(np.all(np.isfinite(np.frombuffer(finals[0], np.float32))))})
