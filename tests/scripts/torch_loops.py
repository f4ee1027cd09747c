"""Training loops written as for one process, with TorchAgent added, under mpirun -np 2:
clipping, GradScaler, several backward passes per step, two agents in one backward, no_sync,
backward_passes_per_step misuse, stepping without a backward, sparse and channels_last
gradients, fp16 compression near float16's range, LBFGS's closure, agents one after another
on one model, and LocalSGD/EASGD following the trainable set. Every reference is computed in
this process (float64), with no communication. RESULT lines on rank 0."""

import copy

import numpy as np
import torch
from _report import emit

import hvdagents as hva

ctx = hva.init()
BATCH, LR, STEPS = 16, 0.1, 6
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 10)))
Y = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 1)))
TOKENS = torch.from_numpy(rng.integers(0, 50, size=(STEPS * BATCH, 4)))
HALVES = [np.asarray(hva.shard(np.arange(BATCH), rank=r, size=ctx.size)) for r in range(ctx.size)]


def make(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]).numpy()


def report(name, **values):
    if ctx.is_root:
        emit({"check": name, **values})


def identical(model):
    mine = flat(model).tobytes()
    return all(g == mine for g in ctx.comm.allgather(mine))


def rel(ours, reference):
    a, b = flat(ours), flat(reference)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def rows(step, rank=None):
    """The step's full batch (rank None: the one-process reference) or a rank's half."""
    index = np.arange(step * BATCH, (step + 1) * BATCH)
    return index if rank is None else index[HALVES[rank]]


def mse(model, index):
    return torch.nn.functional.mse_loss(model(X[index]), Y[index])


def compare(name, loop, seed=1, **extra):
    """Run ``loop(model, optimizer, rank)`` distributed (rank = this rank) and as the
    one-process reference (rank None); report the relative distance and identity."""
    model, reference = make(seed), make(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    agent = hva.TorchAgent(model, opt, strategy=hva.Sync(**extra))
    loop(model, opt, ctx.rank)
    loop(reference, ref_opt, None)
    agent.close()
    report(name, max_rel=rel(model, reference), identical=identical(model),
           moved=float(np.max(np.abs(flat(reference) - flat(make(seed))))))


def error_of(action):
    try:
        action()
    except hva.UsageError as err:
        return str(err)
    return "no error"


# 1. Clipping by norm and by value between backward and the optimizer's own step.
def clipped(model, opt, rank):
    for s in range(STEPS):
        opt.zero_grad()
        mse(model, rows(s, rank)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        opt.step()


compare("clip", clipped)


# 2. GradScaler: unscale_, clip, scaler.step (which calls optimizer.step itself), update. At
#    step 3 rank 1's half of the batch (the same rows in the reference) makes the loss
#    infinite: every rank must skip that step, as the one process does.
def scaled(model, opt, rank):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for s in range(STEPS):
        opt.zero_grad()
        poison = float("inf") if s == 3 else 1.0
        if rank is None:
            a, b = (rows(s, r) for r in range(2))
            loss = (mse(model, a) + poison * mse(model, b)) / 2
        else:
            loss = mse(model, rows(s, rank)) * (poison if rank == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
    SCALES.append(scaler.get_scale())


SCALES = []


compare("grad_scaler", scaled)
report("grad_scaler_scales", scales=SCALES)  # [ours, reference]: both skipped the same step


# 3. Two losses, one backward each, then one step: the sum of the two means.
def two_losses(model, opt, rank):
    for s in range(STEPS):
        opt.zero_grad()
        mse(model, rows(s, rank)).backward()
        (0.5 * model(X[rows(s, rank)]).abs().mean()).backward()
        opt.step()


compare("two_backwards", two_losses)


# 4. no_sync(): the first micro-batch accumulates locally, the second's backward averages both.
#    Reference: the full batch (each rank's half is two quarters, each loss halved).
def accumulated(model, opt, rank):
    for s in range(STEPS):
        opt.zero_grad()
        if rank is None:
            mse(model, rows(s)).backward()
        else:
            index = rows(s, rank)
            with AGENT.no_sync():
                (mse(model, index[: len(index) // 2]) / 2).backward()
            (mse(model, index[len(index) // 2:]) / 2).backward()
        opt.step()


model, reference = make(11), make(11)
opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
AGENT = hva.TorchAgent(model, opt)
accumulated(model, opt, ctx.rank)
accumulated(reference, torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9), None)
AGENT.close()
report("no_sync", max_rel=rel(model, reference), identical=identical(model))
# Stepping after passes made only inside no_sync() is refused: they were never averaged.
model = make(11)
opt = torch.optim.SGD(model.parameters(), lr=LR)
AGENT = hva.TorchAgent(model, opt)
with AGENT.no_sync():
    mse(model, rows(0, ctx.rank)).backward()
report("no_sync_only", message=error_of(opt.step))
AGENT.close()


# 5. A GAN: two agents, and the generator's backward runs through the discriminator, so both
#    agents' hooks fire in one backward pass.
def gan(distributed):
    torch.manual_seed(5)
    gen = torch.nn.Sequential(torch.nn.Linear(4, 10)).double()
    disc = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    g_opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    d_opt = torch.optim.SGD(disc.parameters(), lr=0.05)
    agents = [hva.TorchAgent(disc, d_opt), hva.TorchAgent(gen, g_opt)] if distributed else []
    noise = torch.from_numpy(np.random.default_rng(1).normal(size=(STEPS * BATCH, 4)))
    for s in range(STEPS):
        index = rows(s, ctx.rank if distributed else None)
        d_opt.zero_grad()
        fake = gen(noise[index]).detach()
        d_loss = disc(X[index]).mean() - disc(fake).mean()
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        (-disc(gen(noise[index])).mean()).backward()  # reaches the discriminator's parameters too
        g_opt.step()
    for agent in agents:
        agent.close()
    return gen, disc


(gen, disc), (ref_gen, ref_disc) = gan(True), gan(False)
report("gan", max_rel=max(rel(gen, ref_gen), rel(disc, ref_disc)), identical=identical(gen) and identical(disc))


# 6. backward_passes_per_step=2 with a third pass before the step: refused at that pass.
model = make(6)
opt = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, opt, strategy=hva.Sync(backward_passes_per_step=2))
opt.zero_grad()
for _ in range(2):
    mse(model, rows(0, ctx.rank)).backward()
report("extra_pass", message=error_of(lambda: mse(model, rows(0, ctx.rank)).backward()))
# A step skipped (as GradScaler skips one on inf) then zero_grad(): the passes count again.
opt.zero_grad()
for _ in range(2):
    mse(model, rows(1, ctx.rank)).backward()
opt.zero_grad()
for _ in range(2):
    mse(model, rows(2, ctx.rank)).backward()
opt.step()
report("passes_restart_after_zero_grad", identical=identical(model))
agent.close()

# 7. The optimizer stepped twice without a backward in between: refused at the second step.
model = make(7)
opt = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, opt)
opt.zero_grad()
mse(model, rows(0, ctx.rank)).backward()
opt.step()
before = flat(model)
report("step_twice", message=error_of(opt.step), unchanged=bool(np.array_equal(before, flat(model))))
agent.close()


# 8. Sparse gradients (nn.Embedding(sparse=True)) and channels_last convolutions.
class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.embed = torch.nn.Embedding(50, 6, sparse=True)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def sparse_run(distributed):
    model = Bag().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    agent = hva.TorchAgent(model, opt) if distributed else None
    for s in range(STEPS):
        index = rows(s, ctx.rank if distributed else None)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(TOKENS[index]), Y[index]).backward()
        sparse = model.embed.weight.grad.is_sparse
        opt.step()
    if agent is not None:
        agent.close()
    return model, sparse


(ours, was_sparse), (reference, _) = sparse_run(True), sparse_run(False)
report("sparse", max_rel=rel(ours, reference), identical=identical(ours), still_sparse=was_sparse)


class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 4 * 4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


IMAGES = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 2, 4, 4)))


def conv_run(distributed):
    model = Conv().double().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    agent = hva.TorchAgent(model, opt) if distributed else None
    strided = False
    for s in range(STEPS):
        index = rows(s, ctx.rank if distributed else None)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(IMAGES[index].contiguous(memory_format=torch.channels_last)),
                                     Y[index]).backward()
        strided = strided or not model.conv.weight.grad.is_contiguous()
        opt.step()
    if agent is not None:
        agent.close()
    return model, strided


(ours, strided), (reference, _) = conv_run(True), conv_run(False)
report("channels_last", max_rel=rel(ours, reference), identical=identical(ours), strided=strided)


# 9. fp16 compression with gradients whose sum over the ranks exceeds float16's range (65504):
#    every rank's bias gradient is 5e4, their sum 1e5.
def huge(model, opt, rank):
    for s in range(2):
        opt.zero_grad()
        (model(X[rows(s, rank)]) * 5e4).mean().backward()
        GRADS.setdefault(rank, model[2].bias.grad.clone())
        opt.step()


GRADS = {}
model, reference = make(12), make(12)
opt = torch.optim.SGD(model.parameters(), lr=1e-9)
agent = hva.TorchAgent(model, opt, strategy=hva.Sync(compression="fp16"))
huge(model, opt, ctx.rank)
huge(reference, torch.optim.SGD(reference.parameters(), lr=1e-9), None)
agent.close()
report("fp16_range", finite=bool(np.all(np.isfinite(flat(model)))), max_rel=rel(model, reference),
       bias_grad=float(GRADS[ctx.rank].item()), reference_grad=float(GRADS[None].item()))


# 10. LBFGS: step(closure); the closure returns the mean loss so every rank's line search agrees.
def lbfgs_run(distributed):
    model = make(13)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    agent = hva.TorchAgent(model, opt) if distributed else None
    for s in range(3):
        index = rows(s, ctx.rank if distributed else None)

        def closure(index=index):
            opt.zero_grad()
            loss = mse(model, index)
            loss.backward()
            if distributed:
                return torch.tensor(ctx.comm.allreduce(loss.item()) / ctx.size, dtype=torch.float64)
            return loss

        opt.step(closure)
    if agent is not None:
        agent.close()
    return model


ours, reference = lbfgs_run(True), lbfgs_run(False)
report("lbfgs", max_rel=rel(ours, reference), identical=identical(ours),
       moved=float(np.max(np.abs(flat(reference) - flat(make(13))))))


# 11. Sync, closed, then LocalSGD(period=3) on the same model and optimizer: the first agent's
#     hooks are gone (LocalSGD must not average gradients). Reference: both ranks simulated.
def hooks_on(model):
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


model = make(14)
opt = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, opt, strategy=hva.Sync())
hooks_while_open = hooks_on(model)
for s in range(2):
    opt.zero_grad()
    mse(model, rows(s, ctx.rank)).backward()
    opt.step()
agent.close()
hooks_after = hooks_on(model)
after_sync = flat(model)
agent = hva.TorchAgent(model, opt, strategy=hva.LocalSGD(period=3))
for s in range(2, 5):
    opt.zero_grad()
    mse(model, rows(s, ctx.rank)).backward()
    opt.step()
agent.close()
sims = []
for r in range(ctx.size):  # each rank's model from the common start, then the average
    sim = make(14)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(after_sync.copy()), sim.parameters())
    sim_opt = torch.optim.SGD(sim.parameters(), lr=LR)
    for s in range(2, 5):
        sim_opt.zero_grad()
        mse(sim, rows(s, r)).backward()
        sim_opt.step()
    sims.append(flat(sim))
expected = np.mean(sims, axis=0)
report("sync_then_localsgd", hooks_while_open=hooks_while_open, hooks_after=hooks_after,
       max_rel=float(np.max(np.abs(flat(model) - expected)) / np.max(np.abs(expected))),
       identical=identical(model))


# 12. LocalSGD and EASGD follow the trainable set: the first layer frozen for 3 steps, then
#     unfrozen and added to the optimizer.
def follow(strategy):
    model = make(15)
    model[0].requires_grad_(False)
    frozen_at_start = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model[2].parameters(), lr=LR)
    agent = hva.TorchAgent(model, opt, strategy=strategy)
    frozen_kept = True
    for s in range(STEPS):
        if s == 3:
            frozen_kept = bool(torch.equal(model[0].weight, frozen_at_start))
            model[0].requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters())})
        opt.zero_grad()
        mse(model, rows(s, ctx.rank)).backward()
        opt.step()
    shared = agent.num_parameters == sum(p.numel() for p in model.parameters())
    agent.close()
    return model, frozen_kept, float((model[0].weight.detach() - frozen_at_start).abs().max()), shared


def follow_reference():
    """LocalSGD(period=2) with both ranks simulated: local steps, then the mean every 2."""
    sims = [make(15) for _ in range(ctx.size)]
    opts = []
    for sim in sims:
        sim[0].requires_grad_(False)
        opts.append(torch.optim.SGD(sim[2].parameters(), lr=LR))
    for s in range(STEPS):
        for r, (sim, sim_opt) in enumerate(zip(sims, opts)):
            if s == 3:
                sim[0].requires_grad_(True)
                sim_opt.add_param_group({"params": list(sim[0].parameters())})
            sim_opt.zero_grad()
            mse(sim, rows(s, r)).backward()
            sim_opt.step()
        if s % 2 == 1:
            mean = np.mean([flat(sim) for sim in sims], axis=0)
            for sim in sims:
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(torch.from_numpy(mean.copy()), sim.parameters())
    return sims[0]


model, kept, moved, _ = follow(hva.LocalSGD(period=2))
report("follow_localsgd", frozen_kept=kept, unfrozen_moved=moved, identical=identical(model),
       max_rel=rel(model, follow_reference()))
model, kept, moved, shared = follow(hva.EASGD(alpha=0.5, period=1))
report("follow_easgd", frozen_kept=kept, unfrozen_moved=moved, identical=identical(model), shared=shared)


# 13. A torch.compile'd model (TorchDynamo + AOT autograd; the aot_eager backend needs no C++
#     compiler): the parameters' hooks and the end-of-backward callback still run.
def compiled(model, opt, rank):
    step = torch.compile(model, backend="aot_eager")
    for s in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(step(X[rows(s, rank)]), Y[rows(s, rank)]).backward()
        opt.step()


compare("compiled", compiled, seed=16)


# 14. Misuse and accidents that must not leave the agent wrong or stuck.
def hooks_count(model, opt):
    grads = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return grads + len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


model = make(17)
opt = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, opt)
opt.zero_grad()
mse(model, rows(0, ctx.rank)).backward()  # averaged
with agent.no_sync():
    mse(model, rows(1, ctx.rank)).backward()  # local only, on top of the mean
no_sync_after_mean = error_of(opt.step)
opt.zero_grad()
twin = copy.deepcopy(model)  # a model with an open agent can be copied (EMA, a twin)


extra = torch.optim.SGD([model[0].weight], lr=LR)  # shares a parameter with the open agent
before = hooks_count(model, extra)
try:
    hva.TorchAgent(model, extra)
    refused = "no error"
except hva.UsageError as err:
    refused = str(err)
leftover = hooks_count(model, extra) - before
agent.close()
report("accidents", no_sync_after_mean=no_sync_after_mean,
       shared_refused=refused, hooks_left_by_refused_agent=leftover)
