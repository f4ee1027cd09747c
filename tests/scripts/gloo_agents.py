"""Under a real 'horovodrun --gloo' launch: the context comes from Horovod's environment,
Sync training works, and an asynchronous strategy is refused with the fix."""

import torch
from _report import emit

import hvdagents as hva
from hvdagents.runtime import horovod_binding

ctx = hva.init()
hvd = horovod_binding("torch")
torch.manual_seed(ctx.rank)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())
x = torch.randn(8, 4)
for _ in range(3):
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    agent.step()
flats = hvd.allgather_object(agent.flat_parameters().tobytes())
try:
    hva.TorchAgent(torch.nn.Linear(4, 1), optimizer, strategy=hva.EASGD(alpha=0.5))
    refused = "not refused"
except hva.LauncherError as err:
    refused = str(err)
emit({"rank": ctx.rank, "size": ctx.size, "launcher": ctx.launcher, "mpi_world": ctx.mpi_world,
      "hvd": [hvd.rank(), hvd.size()], "identical": len(set(flats)) == 1, "refused": refused})
