"""Every rank prints its Context and what Horovod (torch binding) and MPI say about it."""

from _report import emit
import sys

import hvdagents as hva

ctx = hva.init()
assert hva.init() is ctx  # idempotent
out = {"rank": ctx.rank, "size": ctx.size, "local_rank": ctx.local_rank, "local_size": ctx.local_size,
       "launcher": ctx.launcher, "mpi_world": ctx.mpi_world, "thread_level": ctx.thread_level,
       "is_root": ctx.is_root, "mpi_rank": ctx.comm.Get_rank(), "mpi_size": ctx.comm.Get_size()}
if "--horovod" in sys.argv:
    from hvdagents.runtime import horovod_binding

    for framework in ("torch", "tensorflow"):
        hvd = horovod_binding(framework)
        out[f"hvd_{framework}"] = [hvd.rank(), hvd.size(), hvd.local_rank()]
emit(out)
