"""State of any size travels whole: start, an optimizer step, checkpoint, resume, close, under mpirun.

Usage: large_model.py N BUFFER_N CHECKPOINT_DIR STRATEGY[,STRATEGY...] [--piece-bytes B]
[--mean-piece M]. ``--piece-bytes``/``--mean-piece`` lower ``hvdagents.collectives``'
``PIECE_BYTES`` and ``MEAN_PIECE`` (module constants read at every call), so that a small model
takes the same many-piece paths as one beyond MPI's 2 GiB message limit.

For each strategy, one after the other in this job: a flat float32 parameter of N elements
and a float32 buffer of BUFFER_N elements (both multiples of 1000), SGD with momentum (its
state, one more copy of the model, is what travels beside the parameters). Every rank first
takes an optimizer step of its own before the agent exists, with values that differ by rank,
so rank 0's momentum travels at construction. Then: one step through the agent, a checkpoint,
everything overwritten, the checkpoint loaded, the buffers set to values that differ by rank,
``close()``. Every value is a small dyadic rational (lr and momentum 1/2), so each expected
tensor is known exactly: after each phase every element of the parameter, its momentum and the
buffer is compared with the expected value, 1000-periodic rows computed here in float64 (the
period does not divide a piece, so a piece put at the wrong offset shows). RESULT on rank 0:
per strategy, every check that failed on any rank (none expected), float64 sums, seconds,
peak memory per rank."""

import argparse
import resource
import time

import numpy as np
import torch
from _report import emit

import hvdagents as hva
import hvdagents.collectives

PERIOD = 1000
LR = MOMENTUM = 0.5

p = argparse.ArgumentParser()
p.add_argument("n", type=int)
p.add_argument("buffer_n", type=int)
p.add_argument("directory")
p.add_argument("strategies")
p.add_argument("--piece-bytes", type=int, default=None)
p.add_argument("--mean-piece", type=int, default=None)
args = p.parse_args()
if args.piece_bytes:
    hvdagents.collectives.PIECE_BYTES = args.piece_bytes
if args.mean_piece:
    hvdagents.collectives.MEAN_PIECE = args.mean_piece
assert args.n % PERIOD == 0 and args.buffer_n % PERIOD == 0
ctx = hva.init()
rank, size = ctx.rank, ctx.size
STRATEGIES = {"sync": lambda: hva.Sync(), "localsgd": lambda: hva.LocalSGD(period=4),
              "easgd": lambda: hva.EASGD(alpha=0.5, period=4)}

j = np.arange(PERIOD, dtype=np.float64)
P = (j - 500) / 8  # rank 0's starting parameter row
C = (j % 7 + 1) / 4  # the gradient's row; rank r's gradients are multiples of it


def k(r):  # rank r's gradient factor in the step through the agent
    return 2 * r + 1


K_MEAN = np.mean([k(r) for r in range(size)])


def row(values):
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def fill_rows(t, values):
    with torch.no_grad():
        t.view(-1, PERIOD).copy_(row(values).expand(t.numel() // PERIOD, PERIOD))


def same(t, values, block=1 << 16):
    """Every element of ``t`` equals its 1000-periodic expected row (float64, cast once)."""
    expected, rows = row(values), t.detach().view(-1, PERIOD)
    if not np.array_equal(np.asarray(values, dtype=np.float32).astype(np.float64), np.asarray(values)):
        return False  # the expected value is not a float32: the test itself is wrong
    return all(torch.equal(rows[a:a + block], expected.expand(min(block, rows.shape[0] - a), PERIOD))
               for a in range(0, rows.shape[0], block))


class Flat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(args.n))
        self.register_buffer("scale", torch.empty(args.buffer_n))


def run(name):
    failed = []

    def check(label, t, values):
        if not same(t, values):
            failed.append(label)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        PHASES.append((label, round(time.monotonic() - started, 1), peak_mib))

    model = Flat()
    fill_rows(model.weight, P * (1 - 2 * rank))  # rank 0: P, the others -P: rank 0's must win
    fill_rows(model.scale, j / 4 + rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model.weight.grad = torch.empty(args.n)  # a step before the agent: momentum (rank + 1) * C
    fill_rows(model.weight.grad, (rank + 1) * C)
    optimizer.step()
    model.weight.grad = None

    def momentum():
        return optimizer.state[model.weight]["momentum_buffer"]

    agent = hva.TorchAgent(model, optimizer, strategy=STRATEGIES[name]())
    w, m = P - LR * C, C.copy()  # rank 0's after its own step: every rank's now
    check("constructed weight", model.weight, w)
    check("constructed momentum", momentum(), m)
    check("constructed buffer", model.scale, j / 4)
    centre = w.copy()

    loss = (model.weight.view(-1, PERIOD) @ row(C)).sum() * k(rank)
    loss.backward()
    agent.step()
    model.weight.grad = None
    g = K_MEAN * C if name == "sync" else k(0) * C  # averaged (Sync) or rank 0's own (period 4)
    m = MOMENTUM * m + g
    w = w - LR * m
    if name == "sync":
        check("stepped weight", model.weight, w)
        check("stepped momentum", momentum(), m)
    path = f"{args.directory}/{name}.pt"
    agent.save_checkpoint(path, epoch=1)
    ctx.comm.Barrier()  # rank 0 has written
    with torch.no_grad():
        model.weight.fill_(7.0)
        momentum().fill_(7.0)
        model.scale.fill_(7.0)
    extra = agent.load_checkpoint(path)
    if extra != {"epoch": 1}:
        failed.append(f"extra {extra}")
    check("resumed weight", model.weight, w)  # rank 0's checkpoint on every rank
    check("resumed momentum", momentum(), m)
    check("resumed buffer", model.scale, j / 4)
    fill_rows(model.scale, (rank + 1) * P + rank)  # buffers that drifted apart, as BatchNorm's
    sums = {"weight": model.weight.detach().sum(dtype=torch.float64).item(),
            "momentum": momentum().sum(dtype=torch.float64).item()}
    agent.close()
    # Sync and LocalSGD: the same parameters everywhere already (LocalSGD's last average of
    # equal models changes nothing); EASGD: the centre, rank 0's model at construction and in
    # the checkpoint. The buffer: the float64 mean over the ranks.
    check("closed weight", model.weight, centre if name == "easgd" else w)
    check("closed momentum", momentum(), m)
    check("closed buffer", model.scale, np.mean([(r + 1) * P + r for r in range(size)], axis=0))
    sums["closed_weight"] = model.weight.detach().sum(dtype=torch.float64).item()
    sums["closed_buffer"] = model.scale.sum(dtype=torch.float64).item()
    return failed, sums


started = time.monotonic()
PHASES = []  # rank 0: (check, seconds, peak MiB)
report = {}
for name in args.strategies.split(","):
    failed, sums = run(name)
    everyone = ctx.comm.allgather(failed)
    report[name] = {"failed": {r: f for r, f in enumerate(everyone) if f}, "sums": sums}
peak = ctx.comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
if ctx.is_root:
    emit({"n": args.n, "buffer_n": args.buffer_n, "ranks": size, "strategies": report,
          "piece_bytes": hvdagents.collectives.PIECE_BYTES, "mean_piece": hvdagents.collectives.MEAN_PIECE,
          "seconds": round(time.monotonic() - started, 1), "peak_mib": peak, "phases": PHASES})
