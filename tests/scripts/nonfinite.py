"""A rank whose model turns NaN, 2 ranks. Usage: nonfinite.py STRATEGY.

At step BAD_STEP rank 1 sets one gradient of its second layer to NaN before the optimizer
step, so its parameter ``2.weight`` becomes NaN and the exchange after that step would share
it. The exchange refuses (``NonFiniteError``); rank 1 then reads the shared state one-sidedly
(the centre, or every rank's Gossip model) and prints ``SHARED_FINITE <bool>``, and re-raises:
the uncaught error ends the job. Rank 0 trains on meanwhile, pulling from the shared state,
and prints ``RANK0_NONFINITE step N`` the first time its own parameters hold a NaN or an
infinity (they never should); it prints ``DONE rank 0`` only if the job was not ended.

``sync``: ``Sync(nonfinite="raise")``; rank 1's NaN gradient at step BAD_STEP (put in by a
tensor hook, before the all-reduce) reaches every
rank's averaged gradient, and every rank's optimizer step raises before it changes anything:
each rank prints ``REFUSED rank N step S finite-and-unchanged <bool>``, all wait at a barrier
(so each one's report is out before the first abort), then re-raise.
"""

import sys
import time

import numpy as np
import torch

import hvdagents as hva
from hvdagents.strategies.exchanges import GossipExchange

STRATEGIES = {
    "downpour": lambda: hva.Downpour(period=1),
    "easgd": lambda: hva.EASGD(period=1),
    "gossip": lambda: hva.Gossip(period=1),
    "sync": lambda: hva.Sync(nonfinite="raise"),
}
BAD_STEP = 3  # rank 1's parameter turns NaN at this step
STEPS = 300  # rank 0's steps (a few seconds), then close(), collective


def shared_state(agent: hva.TorchAgent) -> np.ndarray:
    """What every agent reads: the centre (Downpour, EASGD) or every rank's published model."""
    exchange = agent._runner.exchange  # the test looks inside; users have no need to
    if not isinstance(exchange, GossipExchange):
        return exchange.store.pull()
    return np.concatenate([exchange.models.read(r, out=np.empty(exchange.n, exchange.dtype))
                           for r in range(exchange.size)])


def main() -> int:
    ctx = hva.init()
    torch.manual_seed(ctx.rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = hva.TorchAgent(model, optimizer, strategy=STRATEGIES[sys.argv[1]]())
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    reported = False
    for done in range(1, STEPS + 1):
        optimizer.zero_grad()
        poison = None
        if sys.argv[1] == "sync" and ctx.rank == 1 and done == BAD_STEP:
            # before the gradient is accumulated, so the all-reduce carries the NaN
            poison = model[2].weight.register_hook(lambda g: g.index_put((torch.tensor(0), torch.tensor(1)),
                                                                          torch.tensor(float("nan"))))
        torch.nn.functional.mse_loss(model(x), y).backward()
        if poison is not None:
            poison.remove()
        if sys.argv[1] == "sync" and done == BAD_STEP:
            before = agent.get_flat()
            try:
                optimizer.step()
            except hva.NonFiniteError as err:
                after = agent.get_flat()
                same = bool(np.isfinite(after).all() and np.array_equal(before, after))
                print(f"REFUSED rank {ctx.rank} step {err.step} finite-and-unchanged {same}", flush=True)
                ctx.comm.Barrier()
                raise
            continue
        if ctx.rank == 1 and done == BAD_STEP:
            model[2].weight.grad[0, 1] = float("nan")
            try:
                optimizer.step()  # the exchange runs from the step's hook
            except hva.NonFiniteError:
                print(f"SHARED_FINITE {bool(np.isfinite(shared_state(agent)).all())}", flush=True)
                raise
            continue
        optimizer.step()
        if ctx.rank == 0:
            if not reported and not np.isfinite(agent.get_flat()).all():
                print(f"RANK0_NONFINITE step {done}", flush=True)
                reported = True
            time.sleep(0.01)
    agent.close()
    print(f"DONE rank {ctx.rank}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
