"""Elastic training on digits under 'horovodrun --gloo --min-np/--max-np --host-discovery-script'.

Every rank trains an MLP (Adam) with hva.elastic.run and hva.elastic.State(agent, epoch, batch,
position), committing every --commit-every steps and at the end of each epoch: a TorchAgent
(--framework torch: forward, backward, optimizer.step()) or a KerasAgent (--framework keras:
agent.train_on_batch, the Keras custom loop). Failure injection:
--kill E:B:R makes the worker of rank R (or, where R is a host name, the worker on that host)
SIGKILL itself before step B of epoch E (once per job: a mark file in --marks keeps the survivor
that takes rank R afterwards from doing it again).
--lose-hosts HOSTS: the killed worker first makes the discovery script print HOSTS (its host lost
with it). --grow E:B:HOSTS makes rank 0 rewrite the discovery script's hosts file there with HOSTS
("host:slots,host:slots", once), then wait for Horovod's driver to see it (it polls every
second), so that the world grows at the next commit. Each rank that ends prints one RESULT: the
hash of its final parameters and buffers (Keras: and optimizer variables), the test accuracy,
its host name, the world sizes it trained in, the steps it made again after a roll back, and on
survivors the recovery time (from the kill to the first step after it).
--measure K: after training, the ratio of the time of steps that commit every K steps to that of
steps that do not (blocks alternated, same job).
"""

import argparse
import faulthandler
import hashlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
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
parser.add_argument("--lose-hosts", default=None)
parser.add_argument("--hosts-file", default=None)
parser.add_argument("--marks", default=None)
parser.add_argument("--measure", type=int, default=0)
parser.add_argument("--framework", default="torch", choices=["torch", "keras"])
args = parser.parse_args()

job_started = time.time()
ctx = hva.init()
if os.environ.get("ELASTIC_DEBUG"):
    faulthandler.dump_traceback_later(float(os.environ["ELASTIC_DEBUG"]), exit=False)


def debug(*what):
    if os.environ.get("ELASTIC_DEBUG"):
        print(f"[debug pid {os.getpid()} {time.time():.2f}]", *what, file=sys.stderr, flush=True)


digits = load_digits()
x_all = ((digits.data - 8.0) / 8.0).astype(np.float32)
y_all = digits.target.astype(np.int64)
x_train, y_train, x_test, y_test = x_all[:1500], y_all[:1500], x_all[1500:], y_all[1500:]
strategies = {"sync": hva.Sync(), "localsgd": hva.LocalSGD(period=4),
              "diloco": hva.DiLoCo(inner_steps=8, outer_lr=0.7, outer_momentum=0.5)}


class TorchModel:
    """The MLP as a TorchAgent: a step is forward, backward, optimizer.step()."""

    def __init__(self):
        import torch

        self.torch = torch
        torch.manual_seed(ctx.rank)  # different on every rank: the first sync gives every rank rank 0's
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.x, self.y = torch.from_numpy(x_train), torch.from_numpy(y_train)

    def agent(self, strategy):
        return hva.TorchAgent(self.model, self.optimizer, strategy=strategy)

    def step(self, indices):
        indices = self.torch.from_numpy(indices)
        self.optimizer.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x[indices]), self.y[indices])
        loss.backward()
        self.optimizer.step()

    def arrays(self):
        return [value.numpy() for value in self.model.state_dict().values()]

    def accuracy(self):
        with self.torch.no_grad():
            return float((self.model(self.torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())


class KerasModel:
    """The MLP as a KerasAgent: a step is agent.train_on_batch (Keras' compiled train step)."""

    def __init__(self):
        import keras

        keras.utils.set_random_seed(ctx.rank)  # different on every rank, as above
        self.model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                       keras.layers.Dense(10)])
        self.model.compile(optimizer=keras.optimizers.Adam(0.01),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.current = None

    def agent(self, strategy):
        self.current = hva.KerasAgent(self.model, strategy=strategy)
        return self.current

    def step(self, indices):
        self.current.train_on_batch(x_train[indices], y_train[indices])

    def arrays(self):
        # the optimizer's variables too: Adam's moments and its iteration counter
        return [np.asarray(v.numpy()) for v in [*self.model.weights, *self.model.optimizer.variables]]

    def accuracy(self):
        return float((np.argmax(self.model(x_test, training=False).numpy(), axis=1) == y_test).mean())


net = {"torch": TorchModel, "keras": KerasModel}[args.framework]()
agent = net.agent(strategies[args.strategy])
state = hva.elastic.State(agent, epoch=0, batch=0, position=0)

marks = Path(args.marks) if args.marks else None
kill = tuple(int(v) if v.isdigit() else v for v in args.kill.split(":")) if args.kill else None
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
    victim = kill and (epoch, batch) == kill[:2] and kill[2] in (rank, socket.gethostname())
    if victim and not (marks / "killed").exists():
        if args.lose_hosts:  # the host goes with its worker: the discovery script stops listing it
            write_hosts(args.lose_hosts)
        (marks / "killed").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if grow and (epoch, batch) == (int(grow[0]), int(grow[1])) and rank == 0 and not (marks / "grew").exists():
        (marks / "grew").write_text("1")
        write_hosts(grow[2])
        time.sleep(3.0)  # the driver polls the discovery script every second, then tells rank 0


def write_hosts(hosts):
    """Make the discovery script print ``hosts`` ("host:slots,host:slots")."""
    written = Path(args.hosts_file + ".new")
    written.write_text("".join(line + "\n" for line in hosts.split(",")))
    written.replace(args.hosts_file)  # whole: the discovery script never reads half a file


def one_step(indices):
    net.step(indices)
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
            one_step(indices)
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
                one_step(rng.integers(0, len(x_train), args.batch))
                if committing and step % k == 0:
                    state.commit()
            timed[committing] += time.perf_counter() - started
    return timed


train(state)
agent.close()
accuracy = net.accuracy()
digest = hashlib.sha256()
for value in net.arrays():
    digest.update(np.ascontiguousarray(value).tobytes())
report = {"rank": hva.context().rank, "size": hva.context().size, "hash": digest.hexdigest(),
          "host": socket.gethostname(),
          "accuracy": accuracy, "sizes": log["sizes"], "resets": log["resets"],
          "steps": agent.runner_state.step, "redone": log["executed"] - agent.runner_state.step,
          "recovery_s": log["recovery_s"], "epoch": state.epoch, "framework": args.framework,
          "train_s": time.time() - job_started}
if args.measure:
    agent = net.agent(hva.Sync())  # the first one is closed
    timed = measure(hva.elastic.State(agent, epoch=0), args.measure)
    agent.close()
    report["commit_ratio"] = timed[True] / timed[False]
    report["step_ms"] = 1000 * timed[False] / 120
    report["commit_ms"] = 1000 * (timed[True] - timed[False]) / (3 * (40 // args.measure))
emit(report)
sys.stdout.flush()
