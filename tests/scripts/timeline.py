"""hva.init(timeline=PATH, autotune=...) under mpirun -np 2: a few Sync steps, then Horovod is
shut down so its timeline is complete. RESULT per rank: the Horovod settings in force."""

import sys

import torch
from _report import emit

import hvdagents as hva
from hvdagents.horovod_settings import cores_per_rank, in_force
from hvdagents.runtime import horovod_binding

path, autotune = sys.argv[1], sys.argv[2] == "autotune"
ctx = hva.init(timeline=path, autotune=autotune or None)
model = torch.nn.Linear(8, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with hva.TorchAgent(model, optimizer, strategy=hva.Sync()) as agent:
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        agent.step()
try:
    hva.init(timeline=path + ".late")
    late = "accepted"
except hva.UsageError as err:
    late = str(err)
settings = {s.name: [s.value, s.source] for s in in_force(cores_per_rank(ctx.local_size))}
horovod_binding("torch").shutdown()  # flushes and closes the timeline
emit({"rank": ctx.rank, "settings": settings, "late": late, "cores": cores_per_rank(ctx.local_size)})
