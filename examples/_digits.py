"""Shared by the digits examples: scikit-learn's bundled digits (nothing is downloaded),
a fixed train/test split, this rank's training shard, and the common command-line flags."""

from __future__ import annotations

import argparse

import numpy as np

import hvdagents as hva

#: Held-out share of the 1,797 digits; the split is the same on every rank (fixed seed).
TEST_FRACTION = 0.2
SPLIT_SEED = 0

def _period(a: argparse.Namespace) -> dict[str, int]:
    """``--period`` when given; else each strategy keeps its own default (Gossip 1, LocalSGD 8,
    Downpour and EASGD 4; DiLoCo's inner steps here: 8)."""
    return {} if a.period is None else {"period": a.period}


STRATEGIES = {
    "sync": lambda a: hva.Sync(compression=a.compression),
    "localsgd": lambda a: hva.LocalSGD(**_period(a)),
    "downpour": lambda a: hva.Downpour(**_period(a), max_staleness=a.max_staleness,
                                       staleness_aware=a.staleness_aware),
    "easgd": lambda a: hva.EASGD(alpha=a.alpha or easgd_alpha(hva.context().size), **_period(a),
                                 max_staleness=a.max_staleness),
    "gossip": lambda a: hva.Gossip(**_period(a), max_staleness=a.max_staleness),
    "diloco": lambda a: hva.DiLoCo(inner_steps=a.period or 8, outer_lr=a.outer_lr),
    "asyncdiloco": lambda a: hva.AsyncDiLoCo(inner_steps=a.period or 8, outer_lr=a.outer_lr,
                                             max_staleness=a.max_staleness),
}


def easgd_alpha(ranks: int) -> float:
    """EASGD's elasticity by the rule of Zhang et al. (2015): β = ranks × α = 0.9, so the
    centre, which moves by α times the sum of the agents' differences, is damped."""
    return 0.9 / ranks


def parser(description: str, default_strategy: str = "sync") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=default_strategy)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--compression", choices=["fp16"], default=None, help="Sync only: fp16 on the wire")
    p.add_argument("--period", type=int, default=None,
                   help="steps between exchanges (not Sync; default: the strategy's own)")
    p.add_argument("--alpha", type=float, default=None,
                   help="EASGD elasticity (default: 0.9 / ranks, the paper's β = 0.9)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo and AsyncDiLoCo: the outer learning rate")
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--staleness-aware", action="store_true", help="Downpour: scale each push by 1/staleness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="where to train (default: cuda when a GPU is visible; a rank uses its local rank's GPU)")
    p.add_argument("--checkpoint", default=None, help="rank 0 writes a checkpoint here every epoch")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    p.add_argument("--csv", default=None, help="rank 0 logs per-epoch metrics to this CSV")
    return p


def strategy_from(args: argparse.Namespace) -> hva.Strategy:
    return STRATEGIES[args.strategy](args)


def load(dtype: str = "float32"):
    """``(x_train, y_train, x_test, y_test)``: the whole split, identical on every rank."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = int(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train].astype("int64"), x[test], y[test].astype("int64")


def my_shard(x: np.ndarray, y: np.ndarray, ctx: hva.Context) -> tuple[np.ndarray, np.ndarray]:
    """This rank's slice, trimmed to the smallest rank's length so that every rank runs the
    same number of batches per epoch (synchronous strategies need it)."""
    n = len(x) // ctx.size
    return hva.shard(x)[:n], hva.shard(y)[:n]
