"""Checkpoint faults, one mode per run; prints ``RESULT {json}`` lines for the tests.

Usage: checkpoint_faults.py MODE FRAMEWORK DIR [ARGS]   (FRAMEWORK: torch | keras)

- ``writer DIR SAVES``: plain process (a world of one). If ``DIR/ckpt`` exists, load it through
  the agent and check it bitwise against the state of the generation it says it holds, and
  list temporary files beside it; then save generations on and on (``SAVING g`` before each
  save, ``SAVED g seconds`` after), ``SAVES`` times, to be SIGKILLed by the test at chosen
  points. The state of generation g is fixed: weight i = base_i + g, optimizer array i =
  base'_i - g (bases from seeded generators, 2^16 values repeated), ~270 MB in all.
- ``writers DIR``: the kill test's launch. The framework is imported once; then, for each line
  ``SAVES`` read from stdin, a fresh child process (forked before any MPI or framework runtime
  starts, in a process group of its own) prints ``WRITER pid`` and runs ``writer DIR SAVES``;
  this process prints ``EXITED pid status`` when it ends, however it ends.
- ``unsafe DIR``: plain process. Files that run code when unpickled (a marker file appears)
  given to ``load_checkpoint``: each must be refused, naming the file, and run nothing; an
  ``extra`` value that could not load safely is refused at save time, naming its key.
- ``make DIR``: plain process. Checkpoints for the 2-rank test: another model, another strategy.
- ``refuse DIR``: 2 ranks under mpirun. Truncated, corrupted, other-model, other-framework,
  other-strategy and code-running checkpoints, each refused on every rank with the model and
  optimizer unchanged; then the good checkpoint loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

import hvdagents as hva
from hvdagents.checkpoint import CheckpointError

MODE, FRAMEWORK, DIR = sys.argv[1], sys.argv[2], Path(sys.argv[3])
BIG = (4096, 3)  # width, layers: 3 x 4096^2 float32 weights = 200 MB, momentum as much again
SMALL = (32, 1)


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


class RunsCode:
    """Unpickling this object creates ``marker`` (``open(marker, "w")``): code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- the two frameworks behind one small interface ----------------------------------------------
if FRAMEWORK == "torch":
    import torch

    def build(shape, strategy=None, seed=0):
        width, layers = shape
        torch.manual_seed(seed)
        model = torch.nn.Sequential(*[torch.nn.Linear(width if i else 64, width) for i in range(layers)],
                                    torch.nn.Linear(width, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return hva.TorchAgent(model, optimizer, strategy=strategy)

    def train_step(agent, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        agent.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(agent.model(x), y).backward()
        agent.optimizer.step()

    def weights(agent):
        return [t for t in agent.model.state_dict().values()]

    def optimizer_arrays(agent):
        return [s["momentum_buffer"] for s in agent.optimizer.state.values()]

    def as_array(t):
        return t.detach().numpy()

    def assign(t, value):
        with torch.no_grad():
            t.copy_(torch.from_numpy(value))

else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    def build(shape, strategy=None, seed=0):
        width, layers = shape
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((64,)), *[keras.layers.Dense(width) for _ in range(layers)],
                                  keras.layers.Dense(10)])
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return hva.KerasAgent(model, strategy=strategy)

    def train_step(agent, seed):
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((16, 64)).astype("float32"), rng.integers(0, 10, 16)
        agent.model.train_on_batch(x, y)

    def weights(agent):
        return list(agent.model.weights)

    def optimizer_arrays(agent):
        return [v for v in agent.model.optimizer.variables if len(v.shape) > 0]

    def as_array(v):
        return np.asarray(v.numpy())

    def assign(v, value):
        v.assign(value)


def state_digest(agent) -> str:
    """SHA-256 of every weight and every optimizer variable (momentum, counters)."""
    h = hashlib.sha256()
    arrays = [as_array(t) for t in weights(agent)]
    if FRAMEWORK == "torch":
        for s in agent.optimizer.state.values():
            arrays += [as_array(v) if torch.is_tensor(v) else np.asarray(v) for v in s.values()]
    else:
        arrays += [as_array(v) for v in agent.model.optimizer.variables]
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- writer: the kill test's process -------------------------------------------------------------
#: Random values per base, repeated to its shape: what tells generations apart is the offset g
#: on every element, and drawing 2^16 values instead of 67M takes every writer a second less.
BASE_VALUES = 2**16


def bases(agent):
    targets = weights(agent) + optimizer_arrays(agent)
    return [np.resize(np.random.default_rng(i).standard_normal(BASE_VALUES, dtype=np.float32),
                      tuple(as_array(t).shape)) for i, t in enumerate(targets)], targets


def set_generation(agent, base, targets, g):
    n = len(weights(agent))
    for i, (b, t) in enumerate(zip(base, targets)):
        assign(t, b + np.float32(g) if i < n else b - np.float32(g))


def holds_generation(agent, base, g) -> bool:
    targets = weights(agent) + optimizer_arrays(agent)
    n = len(weights(agent))
    return len(targets) == len(base) and all(
        np.array_equal(as_array(t), b + np.float32(g) if i < n else b - np.float32(g))
        for i, (b, t) in enumerate(zip(base, targets)))


def writer(saves: int) -> None:
    agent = build(BIG)
    train_step(agent, 0)  # the optimizer's momentum exists
    base, _ = bases(agent)
    path = DIR / "ckpt"
    generation = 0
    if path.exists():
        leftovers = sorted(n for n in os.listdir(DIR) if n != "ckpt")
        try:
            extra = agent.load_checkpoint(path)
        except Exception as err:  # reported to the test
            result(loaded=None, error=f"{type(err).__name__}: {err}", leftovers=leftovers)
            raise SystemExit(3) from err
        generation = extra["generation"]
        result(loaded=generation, intact=holds_generation(agent, base, generation), leftovers=leftovers,
               bytes=path.stat().st_size)
        generation += 1
    targets = weights(agent) + optimizer_arrays(agent)  # after loading: the optimizer's tensors are new
    for _ in range(saves):
        set_generation(agent, base, targets, generation)
        print(f"SAVING {generation}", flush=True)
        started = time.monotonic()
        agent.save_checkpoint(path, generation=generation)
        print(f"SAVED {generation} {time.monotonic() - started:.3f}", flush=True)
        generation += 1
    result(done=True, leftovers=sorted(n for n in os.listdir(DIR) if n != "ckpt"))


def writers() -> None:
    """One writer process after another, each forked from this one: each is killed or ends
    on its own like a process started anew, without importing the framework again (a second
    of PyTorch's start-up, four of TensorFlow's, per kill)."""
    for line in iter(sys.stdin.readline, ""):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the writer: its own process group, so that the test kills it alone
            os.setpgid(0, 0)
            print(f"WRITER {os.getpid()}", flush=True)
            writer(int(line))
            raise SystemExit(0)  # out of this loop: the interpreter's normal exit (MPI_Finalize)
        _, status = os.waitpid(pid, 0)
        print(f"EXITED {pid} {status}", flush=True)


# -- unsafe files ---------------------------------------------------------------------------------
def unsafe() -> None:
    agent = build(SMALL)
    train_step(agent, 0)
    marker = DIR / "code-ran"
    files = {"bare pickle": DIR / "bare.pkl"}
    with open(files["bare pickle"], "wb") as f:
        pickle.dump({"framework_state": RunsCode(str(marker))}, f)
    if FRAMEWORK == "torch":
        files["torch.save archive"] = DIR / "evil.pt"
        torch.save({"framework_state": RunsCode(str(marker))}, files["torch.save archive"])
        runs = {"torch.save archive": lambda p: torch.load(p, weights_only=False)}
    else:
        files["array archive"] = DIR / "evil.keras-ckpt"
        agent.save_checkpoint(files["array archive"])  # a real one, then its first array replaced
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name", as intended
        with zipfile.ZipFile(files["array archive"], "a") as archive, \
                archive.open("arrays/0.npy", "w") as member:  # a second member of that name wins
            np.lib.format.write_array(member, np.array([RunsCode(str(marker))], dtype=object), allow_pickle=True)
        runs = {"array archive": lambda p: np.load(zipfile.ZipFile(p).open("arrays/0.npy"), allow_pickle=True)}
    runs["bare pickle"] = lambda p: pickle.load(open(p, "rb"))
    before = state_digest(agent)
    for case, path in files.items():
        runs[case](path)  # proof that the file runs code when unpickled as before
        proof = marker.exists()
        marker.unlink(missing_ok=True)
        try:
            agent.load_checkpoint(path)
            error = None
        except CheckpointError as err:
            error = str(err)
        result(case=case, path=str(path), proof=proof, error=error, ran=marker.exists(),
               unchanged=state_digest(agent) == before)
        marker.unlink(missing_ok=True)
    good = DIR / "good"
    agent.save_checkpoint(good, epoch=7, pair=(1, 2.5), note="ok", nested={"a": [1, None, True]})
    kept = good.read_bytes()
    try:
        agent.save_checkpoint(good, epoch=8, hook=RunsCode(str(marker)))
        error = None
    except CheckpointError as err:
        error = str(err)
    result(case="extra at save", error=error, kept=good.read_bytes() == kept,
           leftovers=sorted(n for n in os.listdir(DIR) if n.startswith(".")))
    result(case="extra round trip", extra=repr(sorted(agent.load_checkpoint(good).items())))


# -- checkpoints from elsewhere, and the 2-rank refusal ------------------------------------------
def make() -> None:
    other = build((48, 1))
    other.save_checkpoint(DIR / f"{FRAMEWORK}-other-model.ckpt", epoch=1)
    other.close()
    centre = build(SMALL, strategy=hva.Downpour(period=1), seed=3)
    train_step(centre, 1)
    centre.save_checkpoint(DIR / f"{FRAMEWORK}-downpour.ckpt", epoch=1)
    centre.close()
    result(made=sorted(os.listdir(DIR)))


def refuse() -> None:
    ctx = hva.init()
    comm = ctx.comm
    agent = build(SMALL)
    train_step(agent, ctx.rank)
    good = DIR / f"{FRAMEWORK}-good.ckpt"
    agent.save_checkpoint(good, epoch=2)
    saved = state_digest(agent)
    marker = DIR / f"code-ran-{ctx.rank}"
    other_framework = "keras" if FRAMEWORK == "torch" else "torch"
    cases = {
        "truncated": DIR / "truncated.ckpt",
        "corrupted": DIR / "corrupted.ckpt",
        "other model": DIR / f"{FRAMEWORK}-other-model.ckpt",
        "other strategy": DIR / f"{FRAMEWORK}-downpour.ckpt",
        "other framework": DIR / f"{other_framework}-downpour.ckpt",
        "runs code": DIR / "evil.pkl",
        "missing": DIR / "nothing-here.ckpt",
    }
    if ctx.rank == 0:
        data = good.read_bytes()
        cases["truncated"].write_bytes(data[: len(data) // 2])
        with zipfile.ZipFile(good) as archive:  # one bit of the largest member's data flipped
            info = max(archive.infolist(), key=lambda i: i.file_size)
        flipped = bytearray(data)
        flipped[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0x10
        cases["corrupted"].write_bytes(bytes(flipped))
        with open(cases["runs code"], "wb") as f:
            pickle.dump({"framework_state": RunsCode(str(DIR / "code-ran-0"))}, f)
    comm.Barrier()
    train_step(agent, 10 + ctx.rank)  # the model moved on from the good checkpoint
    for case, path in cases.items():
        before = state_digest(agent)
        try:
            agent.load_checkpoint(path)
            error, kind = None, None
        except (CheckpointError, FileNotFoundError) as err:
            error, kind = str(err), type(err).__name__
        report(comm, rank=ctx.rank, case=case, kind=kind, error=error,
               unchanged=state_digest(agent) == before, ran=marker.exists())
    extra = agent.load_checkpoint(good)
    report(comm, rank=ctx.rank, case="good", extra=extra, restored=state_digest(agent) == comm.bcast(saved, root=0))
    agent.close()


def report(comm, **fields) -> None:
    """Every rank's ``fields``, printed by rank 0 (lines of two ranks would interleave)."""
    for row in comm.gather(fields, root=0) or []:
        result(**row)


if __name__ == "__main__":
    DIR.mkdir(parents=True, exist_ok=True)
    if MODE == "writer":
        writer(int(sys.argv[4]))
    elif MODE == "writers":
        writers()
    elif MODE == "unsafe":
        unsafe()
    elif MODE == "make":
        make()
    else:
        refuse()
