"""A tiny training loop that checkpoints on SIGUSR1 and resumes: the requeue contract in small.

Follows the contract of ``hvdagents.preemption`` exactly as the examples must: a
``PreemptionFlag`` made first, ``should_stop()`` at every step boundary on every rank, rank 0
writing the checkpoint with ``write_atomic``, and ``exit_for_requeue()``. The "model" is a step
counter and a running sum every rank agrees on (an all-reduce per step), so a resumed run can
be checked: it must continue at the checkpointed step with the checkpointed sum.

Prints ``RESULT {json}`` events on rank 0: start, checkpoint, preempted, done.
"""

import argparse
import json
import sys
import time

from hvdagents.preemption import PreemptionFlag

flag = PreemptionFlag()  # first: a USR1 that comes early must not kill the process

import hvdagents as hva  # noqa: E402
from hvdagents.checkpoint import write_atomic  # noqa: E402
from hvdagents.metrics import MetricsLog  # noqa: E402


def report(ctx, **event) -> None:
    if ctx.is_root:
        sys.stdout.write("RESULT " + json.dumps(event) + "\n")  # one write: never split
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--hold-at", type=int, default=0,
                        help="first run only: at this step, wait (up to --hold-s) for the signal, so "
                             "that where training stops does not depend on how fast the machine is")
    parser.add_argument("--hold-s", type=float, default=120.0)
    ns = parser.parse_args()
    ctx = hva.init()
    from mpi4py import MPI

    step, total = 0, 0
    if ns.resume:
        state = None
        if ctx.is_root:
            with open(ns.checkpoint) as handle:
                state = json.load(handle)
        state = ctx.comm.bcast(state, root=0)
        step, total = state["step"], state["total"]
    report(ctx, event="start", step=step, total=total, resumed=ns.resume, size=ctx.size)
    log = MetricsLog(ns.csv, is_root=ctx.is_root, append=ns.resume) if ns.csv else None

    def save(at: int) -> None:
        if ctx.is_root:
            data = json.dumps({"step": at, "total": total}).encode()
            write_atomic(ns.checkpoint, lambda handle: handle.write(data))
        report(ctx, event="checkpoint", step=at, total=total)

    while step < ns.steps:
        time.sleep(ns.step_seconds)
        total += ctx.comm.allreduce(step, op=MPI.SUM)
        step += 1
        if log is not None:
            log.log(step=step, loss=1.0 / step, accuracy=1.0 - 1.0 / (step + 1))
        if step % ns.checkpoint_every == 0:
            save(step)
        if step == ns.hold_at and not ns.resume:
            # should_stop() is collective and agreed, and the count of waits is the same on
            # every rank (no clock of its own), so every rank leaves the wait together
            for _ in range(int(ns.hold_s / 0.1)):
                if flag.should_stop():
                    break
                time.sleep(0.1)
        if flag.should_stop():
            if step % ns.checkpoint_every:
                save(step)
            report(ctx, event="preempted", step=step, signal=flag.signal, requested_here=flag.requested)
            if log is not None:
                log.close()
            flag.exit_for_requeue()
    report(ctx, event="done", step=step, total=total)
    if log is not None:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
