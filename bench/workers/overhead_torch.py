"""TorchAgent(Sync) against the bare ``horovod.torch.DistributedOptimizer`` loop and PyTorch's
``DistributedDataParallel`` (gloo), interleaved.

The loops train their own copy of the same MLP on the same fixed batch, in one MPI job, in
rotating order, so all see the same machine state. Rank 0 prints the steps per second of
every repetition. DDP's gloo group meets at rank 0's ``MASTER_ADDR`` (default 127.0.0.1) on
a port rank 0 picks.
"""

from __future__ import annotations

import horovod.torch as hvd
import torch
import torch.distributed as dist
from mpi4py import MPI  # mpi4py initialises MPI at MPI_THREAD_MULTIPLE, as Horovod needs

import hvdagents as hva
from bench.workers._util import emit, init_gloo, overhead_args, timed, torch_mlp
from hvdagents.runtime import horovod_binding

LR = 0.01
MOMENTUM = 0.9
SEED = 0


def main() -> None:
    args = overhead_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    horovod_binding("torch")  # Horovod started as the agents start it (hvdagents' settings), shared by all loops
    init_gloo(comm)
    gen = torch.Generator().manual_seed(SEED + comm.Get_rank())
    x = torch.randn(args.batch, args.dims[0], generator=gen)
    y = torch.randint(0, args.dims[-1], (args.batch,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()

    # bare Horovod, as its documentation writes it
    bare_model = torch_mlp(args.dims, SEED)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=LR, momentum=MOMENTUM)
    hvd.broadcast_parameters(bare_model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(bare_opt, root_rank=0)
    bare_opt = hvd.DistributedOptimizer(bare_opt, named_parameters=bare_model.named_parameters())

    def bare_step() -> None:
        bare_opt.zero_grad()
        loss_fn(bare_model(x), y).backward()
        bare_opt.step()

    # hvdagents
    our_model = torch_mlp(args.dims, SEED)
    our_opt = torch.optim.SGD(our_model.parameters(), lr=LR, momentum=MOMENTUM)
    agent = hva.TorchAgent(our_model, our_opt, strategy=hva.Sync())

    def our_step() -> None:
        our_opt.zero_grad()
        loss_fn(our_model(x), y).backward()
        agent.step()

    # PyTorch DistributedDataParallel over gloo, as its documentation writes it
    ddp_model = torch.nn.parallel.DistributedDataParallel(torch_mlp(args.dims, SEED))
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=LR, momentum=MOMENTUM)

    def ddp_step() -> None:
        ddp_opt.zero_grad()
        loss_fn(ddp_model(x), y).backward()
        ddp_opt.step()

    variants = {"ours": our_step, "bare": bare_step, "ddp": ddp_step}
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            step = variants[name]

            def body(step=step) -> None:
                for _ in range(args.steps):
                    step()

            rates[name].append(args.steps / timed(comm, body))
    params = sum(p.numel() for p in our_model.parameters())
    agent.close()
    dist.destroy_process_group()
    if comm.Get_rank() == 0:
        emit({"framework": "torch", "ranks": comm.Get_size(), "parameters": params, "dims": args.dims,
              "batch": args.batch, "steps": args.steps, "steps_per_s": rates})


if __name__ == "__main__":
    main()
