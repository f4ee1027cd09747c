"""Peak host memory of one rank under one strategy: a flat PyTorch model of ``n`` float32
parameters with SGD + momentum, first trained without an agent (the baseline, measured in the
same process), then through an agent: construct, a few steps with exchanges, a checkpoint
written and loaded, close. Peak resident memory (``ru_maxrss``) at the start (the interpreter,
PyTorch and MPI, before the model exists) and after each phase."""

from __future__ import annotations

import argparse
import resource
import tempfile

import torch
from _util import emit

import hvdagents as hva

STRATEGIES = {
    "sync": lambda: hva.Sync(),
    "localsgd": lambda: hva.LocalSGD(period=2),
    "downpour": lambda: hva.Downpour(period=2),
    "easgd": lambda: hva.EASGD(alpha=0.5, period=2),
    "gossip": lambda: hva.Gossip(period=2),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=list(STRATEGIES), required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    ctx = hva.init()
    start = peak_mib()  # before the model: what the baseline's training adds is measured
    weight = torch.nn.Parameter(torch.zeros(args.n))
    model = torch.nn.ParameterList([weight])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        (weight * weight).sum().backward()

    for _ in range(args.steps):  # the baseline: the same training without an agent
        step()
        optimizer.step()
    phases = {"start": start, "baseline": peak_mib()}
    agent = hva.TorchAgent(model, optimizer, strategy=STRATEGIES[args.strategy]())
    phases["construct"] = peak_mib()
    for _ in range(args.steps):
        step()
        agent.step()
    phases["train"] = peak_mib()
    with tempfile.TemporaryDirectory() as tmp:
        path = ctx.comm.bcast(tmp, root=0) + "/memory.pt"
        agent.save_checkpoint(path)
        ctx.comm.Barrier()
        agent.load_checkpoint(path)
        phases["checkpoint"] = peak_mib()
        agent.close()
        phases["close"] = peak_mib()
        ctx.comm.Barrier()
    everyone = ctx.comm.gather(phases, root=0)
    if ctx.is_root:
        emit({"strategy": args.strategy, "n": args.n, "model_mib": args.n * 4 / 2**20,
              "ranks": ctx.size, "phases_mib": everyone})


if __name__ == "__main__":
    main()
