"""Train an MLP on scikit-learn's digits with PyTorch on every rank.

    mpirun -np 2 python examples/torch_digits.py --epochs 12
    mpirun -np 4 python examples/torch_digits.py --strategy easgd

Rank 0 shows a tqdm bar, logs epochs to --csv, checkpoints to --checkpoint, and prints the
final test accuracy of the model every rank agrees on after ``agent.close()``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from tqdm import tqdm

import hvdagents as hva
from hvdagents.metrics import MetricsLog
from hvdagents.preemption import PreemptionFlag

import _digits


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        return float((model(torch.from_numpy(x).to(device)).argmax(1).cpu().numpy() == y).mean())


def main(argv: list[str] | None = None, default_strategy: str = "sync") -> float | None:
    args = _digits.parser(__doc__.splitlines()[0], default_strategy).parse_args(argv)
    # SIGUSR1 (SLURM preemption, slurm/requeue.sbatch): checkpoint at the epoch's end, exit 75
    preempted = PreemptionFlag() if args.checkpoint else None
    ctx = hva.init()
    torch.manual_seed(args.seed + ctx.rank)  # differs per rank: the agent broadcasts rank 0's
    x_train, y_train, x_test, y_test = _digits.load()
    x, y = _digits.my_shard(x_train, y_train, ctx)
    # after hva.init(): it pinned this rank to its local rank's GPU, which is device 0 now
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    agent = hva.TorchAgent(model, optimizer, strategy=_digits.strategy_from(args))
    start_epoch = 0
    if args.resume and args.checkpoint and os.path.exists(args.checkpoint):
        start_epoch = agent.load_checkpoint(args.checkpoint)["epoch"]
    steps = math.ceil(len(x) / args.batch_size)
    rng = np.random.default_rng(args.seed + ctx.rank)
    loss_fn = torch.nn.CrossEntropyLoss()
    log = MetricsLog(args.csv, is_root=ctx.is_root, append=start_epoch > 0) if args.csv else None
    bar = tqdm(total=(args.epochs - start_epoch) * steps, disable=not ctx.is_root, desc="train", unit="step")
    for epoch in range(start_epoch, args.epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for i in range(steps):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(torch.from_numpy(x[idx]).to(device)), torch.from_numpy(y[idx]).to(device))
            loss.backward()
            agent.step()
            total += loss.item()
            bar.update()
        test_acc = accuracy(model, x_test, y_test)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / steps:.3f}", test_acc=f"{test_acc:.3f}")
        if log:
            log.log(epoch=epoch + 1, step=(epoch + 1) * steps, loss=total / steps, accuracy=test_acc)
        if args.checkpoint:
            agent.save_checkpoint(args.checkpoint, epoch=epoch + 1)
        if preempted is not None and preempted.should_stop():  # collective: same answer everywhere
            bar.close()
            if log:
                log.close()
            preempted.exit_for_requeue()
    bar.close()
    local_steps = agent.runner_state.step
    agent.close()  # one consensus model on every rank
    steps_per_rank = ctx.comm.gather(local_steps, root=0) if ctx.mpi_world else [local_steps]
    if log:
        log.close()
    if not ctx.is_root:
        return None
    final = accuracy(model, x_test, y_test)
    print(f"strategy: {args.strategy}, ranks: {ctx.size}, steps per rank: {steps_per_rank}")
    print(f"final test accuracy: {final:.4f}")
    return final


if __name__ == "__main__":
    main()
