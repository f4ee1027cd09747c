"""One training run of a small causal transformer language model on a generated corpus, for
the low-bandwidth benchmark (``bench/lowbandwidth.py``): every rank trains with AdamW under one
strategy; at every evaluation point rank 0 scores its own model on held-out text, each node's
first rank reads the bytes its host has sent on its network link, and rank 0 prints the curve.

The corpus is a second-order Markov chain over ``VOCAB`` tokens with a few likely successors per
context (seeded, made here: nothing is downloaded); its true conditional entropy on the
held-out text is reported as the floor no model can beat. The clock stops while rank 0
evaluates, so the curve's seconds are training time.

    lowbandwidth.py --strategy diloco --inner-steps 50 --steps 300 [--quick]
    lowbandwidth.py --strategy sync --steps 12 ... --then --strategy diloco --inner-steps 3 --steps 12 ...

Several configurations separated by ``--then`` run one after another in the same job, each from
a fresh model and agent (the same seeds), each printing its own result line; each run's bytes
are counted from its own start, after a barrier that every rank reaches once the previous
run's ``close()`` has returned.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _util import emit

VOCAB, CONTEXT = 64, 32
#: Successors per two-token context and the chain's seed.
FANOUT, SEED = 4, 2311
MODEL = {False: {"dim": 192, "layers": 5}, True: {"dim": 32, "layers": 1}}
TRAIN_TOKENS, HELD_OUT_TOKENS = 1 << 18, 1 << 14
BATCH, LR = 8, 3e-3
EVAL_BATCHES = 16
#: Separates the configurations of several runs in one job (``--quick``: one start-up for all).
THEN = "--then"


def markov_corpus(tokens: int, seed: int) -> tuple[np.ndarray, float]:
    """``tokens`` tokens of the chain and its mean true conditional entropy over them (nats)."""
    rng = np.random.default_rng(SEED)  # the chain: the same on every rank and in every run
    successors = rng.integers(0, VOCAB, size=(VOCAB, VOCAB, FANOUT))
    weights = rng.dirichlet(np.full(FANOUT, 0.5), size=(VOCAB, VOCAB))
    cumulative = np.cumsum(weights, axis=-1).tolist()
    table = successors.tolist()
    draw = np.random.default_rng(seed)  # the text
    picks = draw.random(tokens).tolist()
    out = draw.integers(0, VOCAB, size=2).tolist()
    for t in range(2, tokens):
        a, b = out[-2], out[-1]
        k = min(bisect.bisect_left(cumulative[a][b], picks[t]), FANOUT - 1)
        out.append(table[a][b][k])
    text = np.asarray(out, dtype=np.int64)
    a, b, x = text[:-2], text[1:-1], text[2:]
    # probability of each drawn token given its context (a successor list may repeat a token)
    p = (weights[a, b] * (successors[a, b] == x[:, None])).sum(axis=1)
    return text, float(-np.log(p).mean())


class TinyLM(torch.nn.Module):
    """Token + position embeddings, pre-norm causal transformer layers, a linear head."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, dim)
        self.positions = torch.nn.Parameter(torch.zeros(CONTEXT, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, VOCAB)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions[: x.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True))


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def windows(text: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([text[s:s + CONTEXT + 1] for s in starts]))


def host_bytes_sent() -> int:
    """Bytes this host has sent on its links (every device but loopback)."""
    total = 0
    for dev in Path("/sys/class/net").iterdir():
        if dev.name != "lo":
            total += int((dev / "statistics" / "tx_bytes").read_text())
    return total


def strategy_from(args: argparse.Namespace):
    import hvdagents as hva

    hier = {"hierarchical": True} if args.hierarchical else {}
    if args.strategy == "sync":
        return hva.Sync(**hier)
    if args.strategy == "localsgd":
        return hva.LocalSGD(period=args.inner_steps, **hier)
    if args.strategy == "diloco":
        return hva.DiLoCo(inner_steps=args.inner_steps, fragments=args.fragments, overlap=args.overlap, **hier)
    if args.strategy == "asyncdiloco":
        return hva.AsyncDiLoCo(inner_steps=args.inner_steps, **hier)
    if args.strategy == "downpour":
        return hva.Downpour(period=args.inner_steps, **hier)
    raise SystemExit(f"unknown strategy {args.strategy!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--fragments", type=int, default=1)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--hierarchical", action="store_true")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--eval-every", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    return p


def runs_of(argv: list[str]) -> list[argparse.Namespace]:
    """One configuration per ``--then``-separated part of the command line, in order."""
    parts: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            parts.append([])
        else:
            parts[-1].append(arg)
    return [parser().parse_args(part) for part in parts]


def train(args: argparse.Namespace, ctx, text: np.ndarray, eval_batch: torch.Tensor, floor: float) -> None:
    """One run from a fresh model (the same seed in every run); rank 0 prints its result."""
    from mpi4py import MPI

    import hvdagents as hva

    torch.manual_seed(0)
    model = TinyLM(**MODEL[args.quick])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    agent = hva.TorchAgent(model, optimizer, strategy=strategy_from(args))
    rng = np.random.default_rng(100 + ctx.rank)
    leader = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")) == 0

    curve, seconds = [], 0.0
    MPI.COMM_WORLD.Barrier()
    sent_before = host_bytes_sent() if leader else 0
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = windows(text, rng.integers(0, TRAIN_TOKENS - CONTEXT - 1, size=BATCH))
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        agent.step()
        if step % args.eval_every == 0 or step == args.steps:
            seconds += time.perf_counter() - started
            point = {"step": step, "seconds": seconds, "sent": host_bytes_sent() - sent_before if leader else 0}
            if ctx.is_root:
                with torch.no_grad():
                    point["loss"] = float(loss_of(model, eval_batch))
            curve.append(point)
            started = time.perf_counter()
    agent.close()
    with torch.no_grad():
        final = float(loss_of(model, eval_batch))
    curves = MPI.COMM_WORLD.gather(curve, root=0)
    if ctx.is_root:
        for i, point in enumerate(curve):  # bytes every host sent by that point, summed over hosts
            point["sent"] = sum(c[i]["sent"] for c in curves)
        emit({"strategy": args.strategy, "inner_steps": args.inner_steps, "fragments": args.fragments,
              "hierarchical": args.hierarchical, "parameters": sum(p.numel() for p in model.parameters()),
              "curve": curve, "final_loss": final, "floor": floor, "ranks": ctx.size})


def main() -> None:
    runs = runs_of(sys.argv[1:])

    import hvdagents as hva

    torch.set_num_threads(1)
    ctx = hva.init()

    text, _ = markov_corpus(TRAIN_TOKENS, seed=1)
    held_out, floor = markov_corpus(HELD_OUT_TOKENS, seed=2)
    eval_batch = windows(held_out, np.arange(EVAL_BATCHES * BATCH) * (CONTEXT + 1) % (HELD_OUT_TOKENS - CONTEXT - 1))
    for args in runs:
        train(args, ctx, text, eval_batch, floor)


if __name__ == "__main__":
    main()
