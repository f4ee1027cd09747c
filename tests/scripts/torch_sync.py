"""Sync-training checks for TorchAgent, run under mpirun -np 2. Prints RESULT lines on rank 0.

The last two checks refuse: models that differ between ranks (names, dtypes, buffers), and
one-sided windows whose probe totals come back wrong (last: the verdict is cached)."""

import copy
import hashlib
import json
import tempfile

import numpy as np
import torch

import hvdagents as hva

ctx = hva.init()
hvd = __import__("horovod.torch", fromlist=["x"])
STEPS, BATCH, LR = 6, 16, 0.1
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 10)))
Y = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 1)))


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def report(name, **values):
    if ctx.is_root:
        print("RESULT " + json.dumps({"check": name, **values}), flush=True)


def digest(model, optimizer, what):
    """A hash of the parameters, their gradients (``what="grads"``) or the parameters and the
    optimizer's state (``what="state"``), to compare the ranks' bits."""
    h = hashlib.sha256()
    if what == "grads":
        tensors = [p.grad for p in model.parameters()]
    else:
        tensors = [*model.parameters(), *(t for st in optimizer.state.values() for t in st.values()
                                         if torch.is_tensor(t))]
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(agent, model, optimizer, steps=STEPS, digests=None):
    """``digests``: a list to append, at every step, the hash of the gradients after backward
    and of the parameters and optimizer state after the step."""
    for s in range(steps):
        xb, yb = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
        mine = hva.shard(np.arange(BATCH))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(xb[mine]), yb[mine]).backward()
        if digests is not None:
            digests.append(digest(model, optimizer, "grads"))
        agent.step()
        if digests is not None:
            digests.append(digest(model, optimizer, "state"))


def every_step_identical(name, digests):
    """Report whether every rank hashed the same bits at every step (gathered once, at the end:
    no collective of the script's own between steps)."""
    gathered = hvd.allgather_object(digests)
    report(name, identical=all(d == gathered[0] for d in gathered), hashes=len(digests),
           distinct=len(set(digests)), ranks=len(gathered))


# 1. ranks seeded differently start from rank 0's weights
model = make_model(seed=100 + ctx.rank)
rank0_initial = copy.deepcopy(make_model(seed=100))
initial_flat = flat(rank0_initial)
optimizer = torch.optim.SGD(model.parameters(), lr=LR)
agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())
report("starts_from_rank0", equal=bool(np.array_equal(flat(model), flat(rank0_initial))))


# 1b. ... and from rank 0's buffers and optimizer state: before the agent, each rank trains on
#     its own for 1 + rank steps (Adam's moments and step counts, BatchNorm's running statistics
#     and num_batches_tracked then differ per rank); after, every tensor is rank 0's, bitwise.
def trained_alone(rank):
    torch.manual_seed(200 + rank)
    m = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                            torch.nn.Linear(8, 1)).double()
    o = torch.optim.Adam(m.parameters(), lr=0.01)
    for k in range(1 + rank):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(X[k * 8:(k + 1) * 8] + rank), Y[k * 8:(k + 1) * 8]).backward()
        o.step()
    return m, o


def state_parts(m, o):
    """Bytes of the parameters, the buffers and the optimizer's state tensors (``step`` too)."""
    optim = [t for st in o.state_dict()["state"].values() for _, t in sorted(st.items())]
    return {"parameters": [p.detach().numpy().tobytes() for p in m.parameters()],
            "buffers": [b.numpy().tobytes() for b in m.buffers()],
            "optimizer": [torch.as_tensor(t).numpy().tobytes() for t in optim]}


m1, o1 = trained_alone(ctx.rank)
before1 = hvd.allgather_object(state_parts(m1, o1))
a1 = hva.TorchAgent(m1, o1, strategy=hva.Sync())
after1 = hvd.allgather_object(state_parts(m1, o1))
rank0_alone = state_parts(*trained_alone(0))  # rank 0's state, rebuilt here without communication
a1.close()
report("starts_from_rank0_state",
       **{f"{part}_equal": all(a[part] == rank0_alone[part] for a in after1) for part in rank0_alone},
       **{f"{part}_differed": len({repr(b[part]) for b in before1}) > 1 for part in rank0_alone})

# 2. equivalence with one process on the full batches (float64, plain SGD); every step's
#    gradients and parameters hashed on every rank
sync_digests = []
train(agent, model, optimizer, digests=sync_digests)
reference = rank0_initial
ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
for s in range(STEPS):
    ref_opt.zero_grad()
    torch.nn.functional.mse_loss(reference(X[s * BATCH:(s + 1) * BATCH]), Y[s * BATCH:(s + 1) * BATCH]).backward()
    ref_opt.step()
ours, theirs = flat(model), flat(reference)
report("equivalence", max_rel=float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))),
       moved=float(np.max(np.abs(theirs - initial_flat))))

# 3. bit-identical on every rank after k sync steps
gathered = hvd.allgather_object(ours.tobytes())
report("identical", identical=all(g == gathered[0] for g in gathered), ranks=len(gathered))
every_step_identical("identical_every_step", sync_digests)
sync_params = ours

# 4. LocalSGD(period=1) with plain SGD == Sync
model2 = make_model(seed=100 + ctx.rank)
optimizer2 = torch.optim.SGD(model2.parameters(), lr=LR)
agent2 = hva.TorchAgent(model2, optimizer2, strategy=hva.LocalSGD(period=1))
train(agent2, model2, optimizer2)
agent2.close()
report("localsgd_equals_sync", max_abs=float(np.max(np.abs(flat(model2) - sync_params))))

# 5. checkpoint after 2 "epochs", resume for 1 more == 3 straight (momentum: optimizer state matters)
def fresh(seed):
    m = make_model(seed)
    o = torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)
    return m, o, hva.TorchAgent(m, o, strategy=hva.Sync())


def epochs(agent, model, optimizer, n):
    for _ in range(n):
        train(agent, model, optimizer, steps=STEPS)


m3, o3, a3 = fresh(7)
momentum_digests = []
for _ in range(3):
    train(a3, m3, o3, digests=momentum_digests)
every_step_identical("identical_every_step_momentum", momentum_digests)
with tempfile.TemporaryDirectory() as tmp:
    path = hvd.broadcast_object(tmp, root_rank=0) + "/ckpt.pt"
    m4, o4, a4 = fresh(7)
    epochs(a4, m4, o4, 2)
    a4.save_checkpoint(path, epoch=2)
    hvd.allreduce(torch.zeros(1), name="barrier")  # rank 0 has written before anyone reads
    m5, o5, a5 = fresh(99)  # a different start: everything must come from the checkpoint
    extra = a5.load_checkpoint(path)
    epochs(a5, m5, o5, 1)
report("resume", bitwise=bool(np.array_equal(flat(m5), flat(m3))), epoch=extra.get("epoch"))

# 6. fp16 compression is really applied: close to Sync, but not bit-equal
model6 = make_model(seed=100 + ctx.rank)
optimizer6 = torch.optim.SGD(model6.parameters(), lr=LR)
agent6 = hva.TorchAgent(model6, optimizer6, strategy=hva.Sync(compression="fp16"))
train(agent6, model6, optimizer6)
report("fp16", max_abs=float(np.max(np.abs(flat(model6) - sync_params))))

# 7. backward_passes_per_step=2: two half-batch passes then one step == one full-batch step
model7 = make_model(seed=100 + ctx.rank)
optimizer7 = torch.optim.SGD(model7.parameters(), lr=LR)
agent7 = hva.TorchAgent(model7, optimizer7, strategy=hva.Sync(backward_passes_per_step=2))
for s in range(STEPS):
    xb, yb = X[s * BATCH:(s + 1) * BATCH], Y[s * BATCH:(s + 1) * BATCH]
    mine = hva.shard(np.arange(BATCH))
    optimizer7.zero_grad()
    for half in (mine[: len(mine) // 2], mine[len(mine) // 2:]):
        (torch.nn.functional.mse_loss(model7(xb[half]), yb[half]) / 2).backward()
    agent7.step()
report("backward_passes", max_rel=float(np.max(np.abs(flat(model7) - sync_params)) / np.max(np.abs(sync_params))))

# 8. zero_grad() between backward() and step(): the averaging ended with backward, so nothing is
#    in flight; the step then has no gradients and changes nothing, as in one process.
model8 = make_model(seed=1)
optimizer8 = torch.optim.SGD(model8.parameters(), lr=LR)
agent8 = hva.TorchAgent(model8, optimizer8, strategy=hva.Sync())
before8 = flat(model8)
torch.nn.functional.mse_loss(model8(X[:4]), Y[:4]).backward()
optimizer8.zero_grad()
try:
    agent8.step()
    message = "no error"
except hva.UsageError as err:
    message = str(err)
report("zero_grad_before_step", message=message, unchanged=bool(np.array_equal(before8, flat(model8))))


# 9. Models that differ between ranks in names, dtypes or buffers: ModelMismatchError on every
#    rank naming the parameter, before any collective on the model (rank 1's tensors stay its
#    own: nothing was broadcast), and the job goes on (no rank is left inside a collective).
class Small(torch.nn.Module):
    def __init__(self, seed, head="head", head_dtype=torch.float64, extra_buffer=False,
                 buffer_dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Linear(8, 4).double()
        setattr(self, head, torch.nn.Linear(4, 1).to(head_dtype))
        self.register_buffer("scale", torch.ones(4, dtype=buffer_dtype))
        if extra_buffer:
            self.register_buffer("shift", torch.zeros(4, dtype=torch.float64))


MISMATCHES = {  # rank 1's model; rank 0 builds Small(seed) with the defaults
    "names": {"head": "out"},
    "dtypes": {"head_dtype": torch.float32},
    "extra_buffer": {"extra_buffer": True},
    "buffer_dtype": {"buffer_dtype": torch.float32},
}
for case, differs in MISMATCHES.items():
    model9 = Small(300 + ctx.rank, **(differs if ctx.rank == 1 else {}))
    own = {k: v.clone() for k, v in model9.state_dict().items()}
    try:
        hva.TorchAgent(model9, torch.optim.SGD(model9.parameters(), lr=LR), strategy=hva.Sync()).close()
        outcome = "not refused"
    except hva.ModelMismatchError as err:
        outcome = f"ModelMismatchError: {err}"
    untouched = all(torch.equal(own[k], v) for k, v in model9.state_dict().items())
    report(f"mismatch_{case}", outcomes=hvd.allgather_object(outcome), untouched=hvd.allgather_object(untouched))


# 10. LAST (the probe's verdict is cached per communicator): windows whose probe totals come back
#     wrong are refused on every rank before any push. Rank 1 sends one probe round fewer, so
#     every rank's totals are off by one (real windows, real accumulates, wrong totals).
from hvdagents.strategies.windows import transport  # noqa: E402

if ctx.rank == 1:
    transport.PROBE_ROUNDS -= 1
model10 = make_model(seed=5)
try:
    hva.TorchAgent(model10, torch.optim.SGD(model10.parameters(), lr=LR), strategy=hva.Downpour()).close()
    outcome = "not refused"
except hva.OneSidedUnavailableError as err:
    outcome = f"OneSidedUnavailableError: {err}"
report("probe_refuses_wrong_totals", outcomes=hvd.allgather_object(outcome))
