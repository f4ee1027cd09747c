"""Time to a target test loss on digits, with and without a straggler, per strategy.

Every (straggler, strategy) run of every repetition happens in this one MPI job, in rotating
order: a fresh MLP (same seed), a fresh TorchAgent, training until rank 0's model reaches
``--target-loss`` on the held-out digits or ``--budget`` seconds pass.

Every step also sleeps ``--device-ms`` after the backward pass: simulated accelerator time.
Four ranks share two cores here, so real compute contends for the CPU, and a rank that sleeps
would speed the others up; a sleep stands for a device of each rank's own, which does not. With
a straggler, the last rank sleeps before each step as long as its previous step's compute took
(forward, backward, simulated device time), so it runs at about half speed.

Rank 0 evaluates its own model every ``EVAL_EVERY`` steps (for Sync the global model; for the
asynchronous strategies the agent's view, which is what a user would checkpoint). Stopping:
Sync ranks agree every ``CHECK_EVERY`` steps through a broadcast from rank 0 (they must make the
same number of steps); asynchronous ranks stop when rank 0's stop message arrives, checked
every ``CHECK_EVERY`` steps without blocking.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hvdagents as hva
from bench.workers._util import emit

SEED = 0
SPLIT_SEED = 0
TEST_FRACTION = 0.2
EVAL_EVERY = 5
CHECK_EVERY = 5
#: Tags of the per-run stop messages start here (one tag per run, so runs never mix).
STOP_TAG_BASE = 100
#: Settings reported with the results.
SETTINGS = ("hidden", "batch", "lr", "momentum", "period", "alpha", "device_ms")
#: Most (time, loss) points of a learning curve kept in the output.
CURVE_POINTS = 60


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The examples' split: scikit-learn's bundled digits, scaled to [0, 1], fixed seed."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def make_strategy(name: str, args: argparse.Namespace) -> hva.Strategy:
    return {
        "sync": lambda: hva.Sync(),
        "downpour": lambda: hva.Downpour(period=args.period, normalize=True),
        "downpour-staleness": lambda: hva.Downpour(period=args.period, normalize=True, staleness_aware=True),
        "easgd": lambda: hva.EASGD(alpha=args.alpha or 0.9 / hva.context().size, period=args.period),
        "gossip": lambda: hva.Gossip(period=1),
    }[name]()


def build(hidden: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def run_one(name: str, straggler: bool, tag: int, data: tuple, args: argparse.Namespace) -> dict:
    """One training run; every rank returns, rank 0's dict holds the results."""
    ctx = hva.context()
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    x, y, x_test, y_test = data
    model = build(args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    strategy = make_strategy(name, args)
    agent = hva.TorchAgent(model, opt, strategy=strategy)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_test), torch.from_numpy(y_test)
    rng = np.random.default_rng(SEED + rank)
    slow = straggler and rank == size - 1
    device_s = args.device_ms / 1e3
    curve: list[tuple[float, float]] = []
    reached = None
    last_compute = 0.0
    steps = 0
    comm.Barrier()
    start = time.perf_counter()
    while True:
        if slow:
            time.sleep(last_compute)
        t0 = time.perf_counter()
        idx = rng.integers(0, len(x), args.batch)
        opt.zero_grad()
        loss_fn(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
        time.sleep(device_s)
        last_compute = time.perf_counter() - t0
        agent.step()
        steps += 1
        done = False
        if rank == 0 and steps % EVAL_EVERY == 0:
            with torch.no_grad():
                test_loss = float(loss_fn(model(xt), yt))
            elapsed = time.perf_counter() - start
            curve.append((elapsed, test_loss))
            if reached is None and test_loss <= args.target_loss:
                reached = elapsed
            done = reached is not None or elapsed > args.budget
        if steps % CHECK_EVERY:
            continue
        if strategy.synchronous:
            if comm.bcast(done, root=0):
                break
        elif rank == 0:
            if done:
                for r in range(1, size):
                    comm.send(None, dest=r, tag=tag)
                break
        elif comm.iprobe(source=0, tag=tag):
            comm.recv(source=0, tag=tag)
            break
    wall = time.perf_counter() - start
    agent.close()
    with torch.no_grad():
        final_loss = float(loss_fn(model(xt), yt))
    step_counts = comm.gather(steps, root=0)
    if rank != 0:
        return {}
    keep = max(1, len(curve) // CURVE_POINTS)
    return {"strategy": name, "straggler": straggler, "reached_s": reached, "wall_s": wall,
            "steps": step_counts, "final_loss": final_loss, "curve": curve[::keep]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategies", default="sync,downpour,downpour-staleness,easgd,gossip")
    p.add_argument("--target-loss", type=float, required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds before a run gives up")
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--period", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="default 0.9 / ranks (β = 0.9)")
    p.add_argument("--device-ms", type=float, default=10.0, help="simulated accelerator time per step")
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = hva.init()
    x_train, y_train, x_test, y_test = load_digits_split()
    x, y = hva.shard(x_train), hva.shard(y_train)
    runs = [(s, straggler) for straggler in (False, True) for s in args.strategies.split(",")]
    results = []
    tag = STOP_TAG_BASE
    for rep in range(args.reps):
        for name, straggler in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            result = run_one(name, straggler, tag, (x, y, x_test, y_test), args)
            tag += 1
            if ctx.is_root:
                results.append({"rep": rep, **result})
    if ctx.is_root:
        emit({"ranks": ctx.size, "target_loss": args.target_loss, "budget_s": args.budget,
              "settings": {k: getattr(args, k) for k in SETTINGS},
              "runs": results})


if __name__ == "__main__":
    main()
