"""Who am I in this job? Prints one ``RESULT {json}`` line per rank, then exits 0.

Used by the SLURM and launch tests: checks ``hva.init()`` under srun/mpirun/horovodrun, that
the ranks form one MPI world (an all-reduce), and with ``--rma`` that one-sided MPI works
(every rank adds 1 into rank 0's window). Any other arguments are echoed back in ``argv``.
"""

import argparse
import json
import os
import socket
import sys

import hvdagents as hva


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rma", action="store_true")
    ns, rest = parser.parse_known_args()
    ctx = hva.init()
    from mpi4py import MPI

    comm = ctx.comm
    rank_sum = comm.allreduce(ctx.rank, op=MPI.SUM)
    rma_total = None
    if ns.rma:
        import numpy as np

        win = MPI.Win.Allocate(8, disp_unit=8, comm=comm)
        np.frombuffer(win.tomemory(), dtype=np.int64)[:] = 0
        comm.Barrier()
        win.Lock(0, MPI.LOCK_SHARED)
        win.Accumulate(np.ones(1, dtype=np.int64), 0, op=MPI.SUM)
        win.Unlock(0)
        comm.Barrier()
        if ctx.rank == 0:
            win.Lock(0, MPI.LOCK_SHARED)
            out = np.zeros(1, dtype=np.int64)
            win.Get_accumulate(np.zeros(1, dtype=np.int64), out, 0, op=MPI.NO_OP)
            win.Unlock(0)
            rma_total = int(out[0])
        comm.Barrier()
        win.Free()
    # One write per line: with unbuffered output, print() writes the text and the newline
    # separately and another rank's line can land in between.
    sys.stdout.write("RESULT " + json.dumps({
        "rank": ctx.rank,
        "size": ctx.size,
        "local_rank": ctx.local_rank,
        "local_size": ctx.local_size,
        "launcher": ctx.launcher,
        "rank_sum": rank_sum,
        "rma_total": rma_total,
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "argv": rest,
    }) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
