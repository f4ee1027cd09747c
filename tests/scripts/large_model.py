"""A model beyond MPI's 2 GiB message limit constructs, checkpoints and resumes, under mpirun.

Usage: large_model.py STRATEGY N_PARAMETERS CHECKPOINT_DIR. The model is one flat float32
parameter (rank 0: 1.0 everywhere, others 0.0); after construction every rank must hold
rank 0's values; a checkpoint written, the parameters changed, and the checkpoint loaded again
must give them back on every rank. RESULT on rank 0 with the seconds and peak memory."""

import resource
import sys
import time

import torch
from _report import emit

import hvdagents as hva

ctx = hva.init()
name, n, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
strategy = {"sync": hva.Sync(), "localsgd": hva.LocalSGD(period=4), "downpour": hva.Downpour(period=4),
            "easgd": hva.EASGD(alpha=0.5, period=4), "gossip": hva.Gossip(period=4)}[name]
started = time.monotonic()


class Flat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((n,), 1.0 if ctx.is_root else 0.0))
        self.register_buffer("scale", torch.full((4,), float(ctx.rank)))


model = Flat()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
agent = hva.TorchAgent(model, optimizer, strategy=strategy)
constructed = bool(model.weight[0] == 1.0 and model.weight[-1] == 1.0)
path = f"{directory}/large.pt"
agent.save_checkpoint(path, epoch=1)
ctx.comm.Barrier()  # rank 0 has written
with torch.no_grad():
    model.weight.fill_(7.0)
extra = agent.load_checkpoint(path)
resumed = bool(model.weight[0] == 1.0 and model.weight[n // 2] == 1.0 and model.weight[-1] == 1.0)
agent.close()
ok = ctx.comm.allgather((constructed, resumed, extra.get("epoch")))
peak = ctx.comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
if ctx.is_root:
    emit({"strategy": name, "n": n, "constructed": all(o[0] for o in ok), "resumed": all(o[1] for o in ok),
          "epochs": [o[2] for o in ok], "seconds": round(time.monotonic() - started, 1), "peak_mib": peak})
