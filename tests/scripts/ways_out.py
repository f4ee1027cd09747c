"""One way out of a training job, 2 ranks: rank 1 leaves (or stops) at step FAIL_STEP while
rank 0 trains on and then closes its agent. Usage: ways_out.py STRATEGY WAY [STRATEGY WAY ...]:
several pairs run one after another in the same job (each with its own model and agent), for
the ways that end well (``closed``, ``uneven``): one launch checks them all.

WAY: ``exit`` (sys.exit(3), agent open), ``caught`` (the script catches an exception, leaves
its loop and returns normally: exit code 0, agent open), ``os_exit`` (os._exit(4)),
``sigkill`` / ``sigterm`` (to itself), ``stall`` (sleeps in the middle of training),
``closed`` (no failure: every rank closes and exits 0), ``requeue`` (every rank leaves
through ``PreemptionFlag.exit_for_requeue()`` at step FAIL_STEP, agent open), ``uneven`` (rank 1 has fewer batches
per epoch, and every rank calls ``PreemptionFlag.should_stop()`` at the end of each epoch).
The failing rank prints ``FAILING_AT <time.time()>`` just before it fails; every rank prints
``DONE STRATEGY WAY rank N`` when it closed that pair's agent, and ``DONE rank N`` when it
finished every pair.
"""

import os
import signal
import sys
import time

import torch

import hvdagents as hva
from hvdagents.preemption import PreemptionFlag

STRATEGIES = {
    "sync": lambda: hva.Sync(),
    "localsgd": lambda: hva.LocalSGD(period=2),
    "downpour": lambda: hva.Downpour(period=2),
    "easgd": lambda: hva.EASGD(period=2),
    "gossip": lambda: hva.Gossip(period=1),
    "staleness": lambda: hva.EASGD(period=2, max_staleness=1),
}
FAIL_STEP = 5  # rank 1 fails after this many steps
STEPS = 40  # rank 0's steps (then close(), collective)
EPOCHS = 4  # ``uneven``: epochs of 6 batches on rank 0, 4 on rank 1


def fail(way: str) -> int:
    print(f"FAILING_AT {time.time():.3f}", flush=True)  # the job's end is timed from here
    if way == "caught":
        try:
            raise RuntimeError("a failure the script caught")
        except RuntimeError as err:
            print(f"rank 1 caught {err!r} and returns without close()", flush=True)
            return 0
    if way == "exit":
        sys.exit(3)
    if way == "os_exit":
        os._exit(4)
    if way == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if way == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(600)  # ``stall``, or a signal that did not end the process
    return 0


def run(ctx, strategy: str, way: str) -> int | None:
    """One (strategy, way): a return value is the script's (rank 1 left), None: it closed."""
    flag = PreemptionFlag() if way in ("uneven", "requeue") else None
    torch.manual_seed(ctx.rank)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = hva.TorchAgent(model, optimizer, strategy=STRATEGIES[strategy]())
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    if way == "uneven":
        for epoch in range(EPOCHS):
            for _ in range(6 if ctx.rank == 0 else 4):
                step()
            print(f"EPOCH {epoch} rank {ctx.rank}", flush=True)
            if flag.should_stop():  # collective, at the end of every epoch
                break
    else:
        for done in range(1, STEPS + 1):
            step()
            if way == "requeue" and done == FAIL_STEP:
                flag.request()
                if flag.should_stop():
                    flag.exit_for_requeue()  # a barrier, then SystemExit(75) on every rank
            if ctx.rank == 1 and done == FAIL_STEP and way not in ("closed", "requeue"):
                return fail(way)
    agent.close()
    if flag is not None:
        flag.close()
    print(f"DONE {strategy} {way} rank {ctx.rank}", flush=True)
    return None


def main() -> int:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        raise SystemExit(f"usage: ways_out.py STRATEGY WAY [STRATEGY WAY ...]; got {args}")
    ctx = hva.init()
    for strategy, way in zip(args[::2], args[1::2]):
        left = run(ctx, strategy, way)
        if left is not None:
            return left
    print(f"DONE rank {ctx.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
