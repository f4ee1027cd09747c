"""After close(), one model on every rank and the one the README promises: parameters from
the strategy, floating buffers the float64 mean of the ranks' buffers, counters rank 0's,
compared with references computed here (tests/scripts/_consensus.py). Every strategy, one
dtype per job. Usage: torch_consensus.py DTYPE. One RESULT line per strategy on rank 0."""

import sys

import numpy as np
import torch
from _consensus import expected_parameters, max_abs, ulps
from _report import emit

import hvdagents as hva

ctx = hva.init()
DTYPE = getattr(torch, sys.argv[1])
EPS = torch.finfo(DTYPE).eps
STEPS = 11  # not a multiple of any period: every rank ends with local steps not yet shared
STRATEGIES = {
    "sync": (hva.Sync(), 1),
    "localsgd": (hva.LocalSGD(period=3), 3),
    "downpour": (hva.Downpour(period=2), 2),
    "easgd": (hva.EASGD(alpha=0.3, period=2), 2),
    "gossip": (hva.Gossip(period=2), 2),
}


def flat(tensors):
    return np.concatenate([t.detach().double().numpy().ravel() for t in tensors])


class LocalProgress:
    """The sum of what this rank's optimizer steps changed. Its hooks are registered before
    the agent's, so they see each local step alone (the agent's exchange runs in its own step
    hook, after these)."""

    def __init__(self, model, optimizer):
        self.model, self.total = model, 0.0
        optimizer.register_step_pre_hook(self.before_step)
        optimizer.register_step_post_hook(self.after_step)

    def before_step(self, *_):
        self.before = flat(self.model.parameters())

    def after_step(self, *_):
        self.total = self.total + flat(self.model.parameters()) - self.before


def gather_to_root(value):
    return ctx.comm.gather(value, root=0)


for name, (strategy, period) in STRATEGIES.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    ).to(DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    progress = LocalProgress(model, optimizer)
    agent = hva.TorchAgent(model, optimizer, strategy=strategy)
    x0 = flat(model.parameters())
    rng = np.random.default_rng(10 + ctx.rank)  # each rank sees other data: its statistics differ
    x = torch.from_numpy(rng.normal(loc=ctx.rank, size=(16, 6))).to(DTYPE)
    y = x.sum(dim=1, keepdim=True)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        agent.step()
        losses.append(ctx.comm.allreduce(loss.item()) / ctx.size)  # the job's mean loss
    with torch.no_grad():  # rank r: 3r more forward passes in train mode, so the counters differ
        for _ in range(3 * ctx.rank):
            model(x)
    bn = model[1]
    floats = [b for b in model.buffers() if b.is_floating_point()]
    pre = gather_to_root((flat(model.parameters()), flat(floats), int(bn.num_batches_tracked),
                          progress.total))
    agent.close()
    post_bytes = [t.detach().view(-1).view(torch.uint8).numpy().tobytes()
                  for t in [*model.parameters(), *model.buffers()]]
    everything = ctx.comm.allgather(post_bytes)
    params_after, buffers_after = flat(model.parameters()), flat(floats)
    if ctx.is_root:
        models, buffers, counters, sums = zip(*pre)
        want = expected_parameters(name, x0, models, sums, period)
        buffer_mean = np.mean(buffers, axis=0)
        emit({
            "strategy": name,
            "dtype": sys.argv[1],
            "identical": all(s == everything[0] for s in everything),
            "finite": bool(np.isfinite(params_after).all() and np.isfinite(buffers_after).all()),
            "models_identical_before": all(np.array_equal(m, models[0]) for m in models),
            # how far each rank's own model was from the promised one (a close() that kept
            # or broadcast one rank's model would be off by this much)
            "params_spread": max(max_abs(m, want) for m in models),
            "params_error": max_abs(params_after, want),
            "buffers_spread_ulps": max(ulps(b, buffer_mean, EPS) for b in buffers),
            "buffers_error_ulps": ulps(buffers_after, buffer_mean, EPS),
            "counters_before": list(counters),
            "counter": int(bn.num_batches_tracked),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        })
