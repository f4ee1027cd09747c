"""Elastic training on digits under 'horovodrun --gloo --min-np/--max-np --host-discovery-script'.

Every rank trains an MLP (Adam) with hva.elastic.run and hva.elastic.State(agent, epoch, batch,
position), committing every --commit-every steps and at the end of each epoch. Failure injection:
--kill E:B:R makes the worker of rank R SIGKILL itself before step B of epoch E (once per job: a
mark file in --marks keeps the survivor that takes rank R afterwards from doing it again).
--grow E:B:HOSTS makes rank 0 rewrite the discovery script's hosts file there with HOSTS
("host:slots,host:slots", once), then wait for Horovod's driver to see it (it polls every
second), so that the world grows at the next commit. Each rank that ends prints one RESULT: the
hash of its final parameters and buffers, the test accuracy, the world sizes it trained in, the
steps it made again after a roll back, and on survivors the recovery time (from the kill to the
first step after it).
--measure K: after training, the ratio of the time of steps that commit every K steps to that of
steps that do not (blocks alternated, same job).
"""

import argparse
import faulthandler
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit
from sklearn.datasets import load_digits

import hvdagents as hva

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--commit-every", type=int, default=5)
parser.add_argument("--strategy", default="sync", choices=["sync", "localsgd", "diloco"])
parser.add_argument("--kill", default=None)
parser.add_argument("--grow", default=None)
parser.add_argument("--hosts-file", default=None)
parser.add_argument("--marks", default=None)
parser.add_argument("--measure", type=int, default=0)
args = parser.parse_args()

ctx = hva.init()
if os.environ.get("ELASTIC_DEBUG"):
    faulthandler.dump_traceback_later(float(os.environ["ELASTIC_DEBUG"]), exit=False)


def debug(*what):
    if os.environ.get("ELASTIC_DEBUG"):
        print(f"[debug pid {os.getpid()} {time.time():.2f}]", *what, file=sys.stderr, flush=True)


digits = load_digits()
x_all = ((digits.data - 8.0) / 8.0).astype(np.float32)
y_all = digits.target.astype(np.int64)
x_train, y_train = torch.from_numpy(x_all[:1500]), torch.from_numpy(y_all[:1500])
x_test, y_test = torch.from_numpy(x_all[1500:]), torch.from_numpy(y_all[1500:])

torch.manual_seed(ctx.rank)  # different on every rank: the first sync gives every rank rank 0's
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
strategy = {"sync": hva.Sync(), "localsgd": hva.LocalSGD(period=4),
            "diloco": hva.DiLoCo(inner_steps=8, outer_lr=0.7, outer_momentum=0.5)}[args.strategy]
agent = hva.TorchAgent(model, optimizer, strategy=strategy)
state = hva.elastic.State(agent, epoch=0, batch=0, position=0)

marks = Path(args.marks) if args.marks else None
kill = tuple(int(v) for v in args.kill.split(":")) if args.kill else None
grow = args.grow.split(":", 2) if args.grow else None
log = {"sizes": [], "resets": 0, "executed": 0, "recovery_s": None, "after_reset": False}


def on_reset():
    debug("reset callback: rank", hva.context().rank, "size", hva.context().size)
    log["resets"] += 1
    log["after_reset"] = True


state.register_reset_callbacks([on_reset])


def at_step(epoch, batch):
    """Failure injection and host changes, before the step (epoch, batch)."""
    rank = hva.context().rank
    if kill and (epoch, batch) == kill[:2] and rank == kill[2] and not (marks / "killed").exists():
        (marks / "killed").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if grow and (epoch, batch) == (int(grow[0]), int(grow[1])) and rank == 0 and not (marks / "grew").exists():
        (marks / "grew").write_text("1")
        written = Path(args.hosts_file + ".new")
        written.write_text("".join(line + "\n" for line in grow[2].split(",")))
        written.replace(args.hosts_file)  # whole: the discovery script never reads half a file
        time.sleep(3.0)  # the driver polls the discovery script every second, then tells rank 0


def one_step(indices):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x_train[indices]), y_train[indices])
    loss.backward()
    optimizer.step()
    log["executed"] += 1
    if log["after_reset"]:
        log["after_reset"] = False
        if log["recovery_s"] is None and marks is not None and (marks / "killed").exists():
            log["recovery_s"] = time.time() - float((marks / "killed").read_text())


@hva.elastic.run
def train(state):
    log["sizes"].append(hva.context().size)
    debug("train entered at", state.epoch, state.batch, "rank", hva.context().rank, "size", hva.context().size)
    while state.epoch < args.epochs:
        while True:
            batch = hva.elastic.epoch_batch(len(x_train), state.position, args.batch, epoch=state.epoch)
            if batch is None:
                break
            at_step(state.epoch, state.batch)
            indices, state.position = batch
            one_step(torch.from_numpy(indices))
            state.batch += 1
            if state.batch % args.commit_every == 0:
                state.commit()
        state.epoch, state.batch, state.position = state.epoch + 1, 0, 0
        state.commit()


@hva.elastic.run
def measure(state, k):
    """Seconds of 3 x 40 steps that commit every k steps, and of 3 x 40 that do not (alternated)."""
    timed = {True: 0.0, False: 0.0}
    rng = np.random.default_rng(hva.context().rank)
    for _ in range(3):
        for committing in (False, True):
            started = time.perf_counter()
            for step in range(1, 41):
                one_step(torch.from_numpy(rng.integers(0, len(x_train), args.batch)))
                if committing and step % k == 0:
                    state.commit()
            timed[committing] += time.perf_counter() - started
    return timed


train(state)
agent.close()
with torch.no_grad():
    accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
digest = hashlib.sha256()
for value in model.state_dict().values():
    digest.update(value.numpy().tobytes())
report = {"rank": hva.context().rank, "size": hva.context().size, "hash": digest.hexdigest(),
          "accuracy": accuracy, "sizes": log["sizes"], "resets": log["resets"],
          "steps": agent.runner_state.step, "redone": log["executed"] - agent.runner_state.step,
          "recovery_s": log["recovery_s"], "epoch": state.epoch}
if args.measure:
    agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())  # the first one is closed
    timed = measure(hva.elastic.State(agent, epoch=0), args.measure)
    agent.close()
    report["commit_ratio"] = timed[True] / timed[False]
    report["step_ms"] = 1000 * timed[False] / 120
emit(report)
sys.stdout.flush()
