"""Rank 1 raises while rank 0 waits in a collective: the job must end quickly, non-zero."""

import sys
import time

import hvdagents as hva

ctx = hva.init()
if ctx.rank == 1:
    time.sleep(0.5)
    print(f"CRASHING_AT {time.time():.3f}", flush=True)  # the job's end is timed from here
    raise RuntimeError("rank one failed on purpose")
mode = sys.argv[1] if len(sys.argv) > 1 else "mpi"
if mode == "horovod":
    import torch

    hvd = hva.runtime.horovod_binding("torch")
    hvd.allreduce(torch.ones(1))
else:
    ctx.comm.barrier()
time.sleep(60)
