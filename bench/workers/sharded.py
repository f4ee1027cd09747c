"""One rank of the sharded benchmark (``bench/sharded.py``): an MLP trained with Adam under one
variant, on the same fixed batch per rank:

- ``sync``: ``TorchAgent(strategy=hva.Sync())``, every rank holds the whole Adam state;
- ``zero1`` / ``zero2``: ``TorchAgent(strategy=hva.ZeRO(stage=1|2))``;
- ``zero_ddp``: PyTorch's ``ZeroRedundancyOptimizer(Adam)`` with ``DistributedDataParallel``
  over gloo (its stage 1), as PyTorch's documentation writes it.

``--part memory``: peak resident memory (``ru_maxrss``) at the start (before the model) and
after construction and training, and the optimizer-state bytes this rank holds. ``--part speed``:
steps per second after warm-up. Rank 0 prints every rank's figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import time

import torch
import torch.distributed as dist
from _util import emit, init_gloo, mlp_dims, torch_mlp
from mpi4py import MPI  # MPI first, at MPI_THREAD_MULTIPLE, as Horovod needs

import hvdagents as hva

VARIANTS = ("sync", "zero1", "zero2", "zero_ddp")
LR = 1e-3


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if torch.is_tensor(t))


def gloo_interface() -> None:
    """Across hosts (``MASTER_ADDR`` not loopback), name for gloo the interface that reaches
    it (``GLOO_SOCKET_IFNAME``): by default gloo binds to the address of the host's name,
    which on the simulated hosts is not the one the other host can reach."""
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if address.startswith("127.") or "GLOO_SOCKET_IFNAME" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        local = s.getsockname()[0]
    listing = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == local:
            os.environ["GLOO_SOCKET_IFNAME"] = fields[1].split("@")[0]
            return


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["memory", "speed"], required=True)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--dims", type=mlp_dims, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    start = peak_mib()
    gen = torch.Generator().manual_seed(comm.Get_rank())
    x = torch.randn(args.batch, args.dims[0], generator=gen)
    y = torch.randint(0, args.dims[-1], (args.batch,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    model = torch_mlp(args.dims)
    if args.variant == "zero_ddp":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        gloo_interface()
        init_gloo(comm)
        model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=LR)

        def step() -> None:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

        def held() -> int:
            return state_bytes(optimizer.optim)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        strategy = hva.Sync() if args.variant == "sync" else hva.ZeRO(stage=int(args.variant[-1]))
        agent = hva.TorchAgent(model, optimizer, strategy=strategy)

        def step() -> None:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

        held = agent.optimizer_state_bytes
    phases = {"start": start, "construct": peak_mib()}
    for _ in range(args.warmup):
        step()
    comm.Barrier()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = comm.allreduce(time.perf_counter() - began, op=MPI.MAX)
    phases["train"] = peak_mib()
    mine = {"phases_mib": phases, "state_bytes": held()}
    if args.variant == "zero_ddp":
        dist.destroy_process_group()
    else:
        agent.close()
    everyone = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        emit({"variant": args.variant, "ranks": comm.Get_size(), "dims": args.dims,
              "parameters": sum(t.numel() for t in model.parameters()), "steps": args.steps,
              "steps_per_s": args.steps / seconds, "per_rank": everyone})


if __name__ == "__main__":
    main()
