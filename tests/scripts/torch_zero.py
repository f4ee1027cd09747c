"""TorchAgent(ZeRO) against TorchAgent(Sync), float64, under mpirun -np 2 or 4; one job loops
over the cases. RESULT lines on rank 0.

``torch_zero.py DIR save``  (2 ranks): equivalence, refusals, clipping, frozen parameters,
uneven data, state bytes, resume; writes DIR/two.pt (ZeRO stage 2, 2 ranks, after 3 steps)
and the straight run's parameters after 6 and 9 steps (DIR/expected6.npy, expected9.npy).
``torch_zero.py DIR load``  (4 ranks): the same cases, then two.pt loaded by ZeRO (stage 1)
and by Sync at 4 ranks, 3 steps each against expected6; ZeRO's agent saves DIR/four.pt.
"""

import os
import sys

import numpy as np
import torch
import torch.utils.checkpoint

import hvdagents as hva
from hvdagents.frameworks import torch_sharded

ctx = hva.init()
hvd = __import__("horovod.torch", fromlist=["x"])
from _report import emit  # noqa: E402

DIRECTORY, PHASE = sys.argv[1], sys.argv[2]
STEPS, BATCH = 5, 16  # BATCH divisible by 1, 2 and 4: N ranks on shards equal one process on the batch
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(12 * BATCH, 5)))
Y = torch.from_numpy(rng.normal(size=(12 * BATCH, 3)))


def report(name, **values):
    if ctx.is_root:
        emit({"check": name, "ranks": ctx.size, **values})


class TanhToFloat(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x).float()


def make_model(mixed=False):
    """66 float64 parameters (66 % 4 == 2: uneven ranges); ``mixed``: the last layer float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    if mixed:
        model[1] = TanhToFloat()
        model[2].float()
    return model


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.02),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.02, weight_decay=0.1),
}


def second_group(model):
    return {"params": list(model[2].parameters()), "lr": 0.03, "weight_decay": 0.02}


def make(strategy, optimizer="adam", mixed=False, one_group=False):
    """Model, optimizer (two param groups with different hyper-parameters; ``one_group``: the
    first only, the second added later) and agent."""
    model = make_model(mixed)
    groups = [{"params": model[0].parameters()}] + ([] if one_group else [second_group(model)])
    opt = OPTIMIZERS[optimizer](groups)
    return model, opt, hva.TorchAgent(model, opt, strategy=strategy)


def backward(model, step, scaler=None, partial=False):
    """``scaler``: a GradScaler; rank 1's loss is infinite at step 2 (every rank must skip it).
    ``partial``: the last layer's weight has a gradient on rank 0 only."""
    rows = np.arange(step * BATCH, (step + 1) * BATCH)[hva.shard(np.arange(BATCH))]
    x = X[rows].to(model[0].weight.dtype)
    if partial and ctx.rank != 0:
        out = torch.nn.functional.linear(model[1](model[0](x)), model[2].weight.detach(), model[2].bias)
    else:
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.double(), Y[rows])
    if scaler is None:
        return loss.backward()
    if step == 2 and ctx.rank == 1:
        loss = loss * float("inf")
    scaler.scale(loss).backward()


def flat(model):
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]).numpy()


def train(model, opt, agent, steps, first=0, clip=None, freeze=None, hook=None, scaler=None, partial=False,
          accumulate=False, add_group=None):
    """``clip``: ("user" | "agent", max_norm); ``freeze``: steps during which layer 0 is frozen;
    ``scaler``: a GradScaler (its scale after every step is appended to the norms);
    ``accumulate``: a backward pass inside ``agent.no_sync()`` (batch s + 6) before each step's
    own; ``add_group``: the step before which the second param group (frozen until then) is
    added.
    Returns the clipping norms (or scales) seen and whether frozen weights kept their bits."""
    norms, kept = [], True
    for s in range(first, first + steps):
        frozen = freeze is not None and s in freeze
        for p in model[0].parameters():
            p.requires_grad_(not frozen)
        before = flat(model)
        if add_group is not None:
            for p in model[2].parameters():
                p.requires_grad_(s >= add_group)
        if s == add_group:
            opt.add_param_group(second_group(model))
        opt.zero_grad()
        if accumulate:
            with agent.no_sync():
                backward(model, s + 6, scaler, partial)
        backward(model, s, scaler, partial)
        if hook is not None:
            hook(s)
        if clip is not None:
            how, max_norm = clip
            norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if how == "user"
                    else agent.clip_grad_norm_(max_norm))
            norms.append(float(norm))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            norms.append(scaler.get_scale())
        else:
            opt.step()
        if frozen:
            kept = kept and bool(np.array_equal(flat(model)[:42], before[:42]))
    for p in model.parameters():
        p.requires_grad_(True)
    return norms, kept


def identical(model):
    mine = flat(model).tobytes()
    return all(g == mine for g in hvd.allgather_object(mine))


# 1. ZeRO stage 1 and 2 equal Sync (SGD with momentum, Adam, AdamW; two param groups; mixed
#    dtypes; clipping by global norm; frozen then unfrozen parameters; small rounds; small
#    buckets (stage 2 reduces them during backward); a weight with a gradient on rank 0 only).
CASES = [(opt, stage, {}) for opt in OPTIMIZERS for stage in (1, 2)] + [
    ("adam", 1, {"clip": ("user", 0.05)}), ("adam", 2, {"clip": ("agent", 0.05)}),
    ("sgd", 1, {"freeze": {1, 2}}), ("adamw", 2, {"freeze": {1, 2}}),
    ("adam", 2, {"mixed": True}), ("adamw", 1, {"rounds": 5}), ("sgd", 2, {"rounds": 5}),
    ("adam", 1, {"scaler": True}), ("adam", 2, {"chunks": 30}), ("sgd", 1, {"chunks": 30, "rounds": 5}),
    ("adamw", 2, {"chunks": 30, "freeze": {1, 2}}), ("adam", 2, {"chunks": 30, "partial": True}),
    ("sgd", 1, {"partial": True}), ("adam", 2, {"accumulate": True}), ("adamw", 1, {"accumulate": True}),
    ("adamw", 2, {"add_group": 2}), ("sgd", 1, {"add_group": 2}), ("sgd", 2, {"chunks": 21}),
]
for name, stage, options in CASES:
    case = "-".join([name, f"stage{stage}", *sorted(options)])
    kwargs = {k: v for k, v in options.items() if k in ("clip", "freeze", "partial", "accumulate", "add_group")}
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)) if options.get("scaler") else lambda: None
    model, opt, agent = make(hva.Sync(), name, options.get("mixed", False), "add_group" in options)
    start = flat(model)
    ref_norms, _ = train(model, opt, agent, STEPS, scaler=scaler(), **kwargs)
    reference = flat(model)
    agent.close()
    torch_sharded.ROUND_ELEMENTS = options.get("rounds", 1 << 24)
    torch_sharded.CHUNK_ELEMENTS = options.get("chunks", 1 << 22)
    model, opt, agent = make(hva.ZeRO(stage=stage), name, options.get("mixed", False), "add_group" in options)
    grads_after_backward = []

    def record(step, model=model, seen=grads_after_backward):
        seen.append([None if p.grad is None else float(p.grad.abs().sum()) for p in model.parameters()])

    freed = []  # stage 2: the last layer's gradients already reduced and freed when backward reaches layer 0
    handle = model[0].weight.register_post_accumulate_grad_hook(
        lambda p, model=model, freed=freed: freed.append(model[2].weight.grad is None and model[2].bias.grad is None))
    norms, kept = train(model, opt, agent, STEPS, hook=record, scaler=scaler(), **kwargs)
    handle.remove()
    buckets = len(agent._sharded._buckets)
    torch_sharded.ROUND_ELEMENTS, torch_sharded.CHUNK_ELEMENTS = 1 << 24, 1 << 22
    dtype_tol = 1e-6 if options.get("mixed") else 1e-9
    report(f"equal:{case}", max_abs=float(np.abs(flat(model) - reference).max()), tol=dtype_tol,
           moved=float(np.abs(reference - start).max()), identical=identical(model),
           user_state=len(opt.state), norms=norms, ref_norms=ref_norms, frozen_kept=kept,
           buckets=buckets, chunks=options.get("chunks"), freed_in_backward=freed,
           grads_none=all(g is None for step in grads_after_backward for g in step),
           grads_full=all(g is not None for step in grads_after_backward for g in step))
    agent.close()

# Stage 2 keeps no whole gradient for GradScaler's inf check: PyTorch's own error, on every rank.
model, opt, agent = make(hva.ZeRO(stage=2), "adam")
try:
    train(model, opt, agent, 1, scaler=torch.amp.GradScaler("cpu"))
    outcome = "no error"
except Exception as err:  # noqa: BLE001 - reported
    outcome = f"{type(err).__name__}: {err}"
agent.close()
report("scaler:stage2", outcomes=hvd.allgather_object(outcome))

# Reentrant checkpointing: layer 0 inside a checkpointed segment and outside it, so its gradient
# accumulates twice in one backward (under stage 2, the second time after its bucket went).
# Against one process on the whole batch (computed on every rank).
def train_checkpointed(strategy):
    model, opt, agent = make(strategy, "adam") if strategy is not None else (None, None, None)
    if strategy is None:
        model = make_model()
        opt = OPTIMIZERS["adam"]([{"params": model[0].parameters()}, second_group(model)])
    for s in range(STEPS):
        rows = np.arange(s * BATCH, (s + 1) * BATCH)
        rows = rows[hva.shard(np.arange(BATCH))] if agent is not None else rows
        x = X[rows].clone().requires_grad_(True)
        inner = torch.utils.checkpoint.checkpoint(lambda t: model[0](torch.tanh(t)), x, use_reentrant=True)
        loss = torch.nn.functional.mse_loss(model[2](torch.tanh(model[0](x) + inner)), Y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = flat(model)
    if agent is not None:
        same = identical(model)
        agent.close()
        return out, same
    return out, True


alone, _ = train_checkpointed(None)
for label, strategy in [("stage2", hva.ZeRO(stage=2))]:  # Sync and stage 1 get this wrong: README
    got, same = train_checkpointed(strategy)
    report(f"reentrant:{label}", max_abs=float(np.abs(got - alone).max()), identical=same,
           moved=float(np.abs(alone - flat(make_model())).max()))

# 2. Optimizers that cannot be cut into ranges are refused on every rank, naming the class.


class MyAdam(torch.optim.Adam):
    pass


for label, build in [("lbfgs", lambda ps: torch.optim.LBFGS(ps)), ("subclass", lambda ps: MyAdam(ps)),
                     ("adafactor", lambda ps: torch.optim.Adafactor(ps))]:
    model = make_model()
    try:
        hva.TorchAgent(model, build(model.parameters()), strategy=hva.ZeRO(stage=2))
        outcome = "accepted"
    except Exception as err:  # noqa: BLE001 - reported
        outcome = f"{type(err).__name__}: {err}"
    report(f"refused:{label}", outcomes=hvd.allgather_object(outcome))

# 3. Optimizer state per rank: this rank's range of each (group, dtype), exactly.
for stage in (1, 2):
    model, opt, agent = make(hva.ZeRO(stage=stage), "adam")
    train(model, opt, agent, 2)
    inner = agent._sharded._inner.state
    elements = sum(t.numel() for st in inner.values() for k, t in st.items() if k != "step")
    expected = 0
    for length in (42, 24):  # the two param groups' elements
        expected += 2 * (length // ctx.size + (1 if ctx.rank < length % ctx.size else 0))  # exp_avg, exp_avg_sq
    report(f"state_bytes:stage{stage}", per_rank=hvd.allgather_object(elements),
           expected=hvd.allgather_object(expected), sync_elements=2 * 66, user_state=len(opt.state),
           bytes=agent.optimizer_state_bytes())
    agent.close()

# 4. Uneven data: rank r has 3 + r batches, then closes; the others go on (a learning-rate
#    schedule they alone step, clipping by the global norm). Sync run the same way is the
#    reference: its parameters, runner state and (longest rank's) Adam state after close.
def uneven(strategy):
    model, opt, agent = make(strategy, "adam")
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    for s in range(3 + ctx.rank):
        opt.zero_grad()
        backward(model, s)
        agent.clip_grad_norm_(0.05)
        opt.step()
        schedule.step()
    agent.close()
    if agent._sharded is None:
        state = opt.state_dict()["state"]
    else:
        state = agent._sharded.state_dict(0)  # collective: the ranges gathered (close kept them)
        state = state["state"] if state is not None else None
    return model, agent.runner_state.to_dict(), state


def state_vector(state):
    return np.concatenate([torch.as_tensor(t, dtype=torch.float64).reshape(-1).numpy()
                           for _, st in sorted(state.items()) for _, t in sorted(st.items())])


model, sync_runner, sync_state = uneven(hva.Sync())
sync_params = flat(model)
for stage in (1, 2):
    model, runner, state = uneven(hva.ZeRO(stage=stage))
    gathered = hvd.allgather_object((float(np.abs(flat(model) - sync_params).max()), runner))
    found = {"max_abs": max(g[0] for g in gathered), "runners": [g[1] for g in gathered],
             "sync_runner": sync_runner, "identical": identical(model)}
    if ctx.is_root:
        found["state_max_abs"] = float(np.abs(state_vector(state) - state_vector(sync_state)).max())
        found["steps"] = sorted({float(st["step"]) for st in state.values()})
    report(f"uneven:stage{stage}", **found)

# 5. Checkpoints: resume bitwise at the same world size; a whole state across world sizes and strategies.
if PHASE == "save":
    for stage in (1, 2):
        model, opt, agent = make(hva.ZeRO(stage=stage), "adam")
        train(model, opt, agent, 3)
        path = os.path.join(DIRECTORY, "two.pt" if stage == 2 else "two-stage1.pt")
        agent.save_checkpoint(path, epoch=3)
        train(model, opt, agent, 3, first=3)
        straight6 = flat(model)
        train(model, opt, agent, 3, first=6)
        if stage == 2 and ctx.is_root:
            np.save(os.path.join(DIRECTORY, "expected6.npy"), straight6)
            np.save(os.path.join(DIRECTORY, "expected9.npy"), flat(model))
        agent.close()
        torch.manual_seed(1 + ctx.rank)
        model, opt, agent = make(hva.ZeRO(stage=stage), "adam")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # a different model: loading must replace it all
        extra = agent.load_checkpoint(path)
        train(model, opt, agent, 3, first=3)
        report(f"resume:stage{stage}", epoch=extra["epoch"], bitwise=bool(np.array_equal(flat(model), straight6)),
               identical=identical(model))
        agent.close()
    saved = torch.load(os.path.join(DIRECTORY, "two.pt"), weights_only=True)["framework_state"]["optimizer"]
    shapes = {str(i): {k: list(v.shape) for k, v in st.items()} for i, st in saved["state"].items()}
    report("saved_state", shapes=shapes, lrs=[g["lr"] for g in saved["param_groups"]])
else:
    expected6 = np.load(os.path.join(DIRECTORY, "expected6.npy"))
    for label, strategy in [("zero1", hva.ZeRO(stage=1)), ("sync", hva.Sync())]:
        model, opt, agent = make(strategy, "adam")
        extra = agent.load_checkpoint(os.path.join(DIRECTORY, "two.pt"))
        train(model, opt, agent, 3, first=3)
        report(f"load:{label}", epoch=extra["epoch"], max_abs=float(np.abs(flat(model) - expected6).max()),
               identical=identical(model))
        if label == "zero1":
            agent.save_checkpoint(os.path.join(DIRECTORY, "four.pt"), epoch=6)
            if ctx.is_root:
                np.save(os.path.join(DIRECTORY, "four_params.npy"), flat(model))
        agent.close()
