"""Runner misuse on every rank: each mistake raises the documented error, the same on all ranks.

Checks: a Gossip matrix of the wrong size is refused at start() before any window exists;
after_step()/finish() before start(), start() twice and after_step() after finish() raise
UsageError; finish() is idempotent; every window is freed after finish(). restore(model, None)
after a "checkpoint load" mid-training (every rank's model replaced by the same vector) restarts the
shared parameters from it: a finish() right after it must give back that vector exactly.
"""

import numpy as np
from _report import emit
from weak_model import VectorModel, strategy, target

from hvdagents.errors import UsageError
from hvdagents.strategies.config import Gossip
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.windows import _base as window


def outcome(call):
    try:
        call()
        return "ok"
    except (UsageError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def run(ctx):
    """Every rank emits its RESULT line (case ``lifecycle``)."""
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    out = {"case": "lifecycle", "rank": rank, "windows_before": len(window._live)}

    model = VectorModel(target(0), target(rank), comm)
    wrong = np.full((size + 1, size + 1), 1.0 / (size + 1)).tolist()
    out["wrong_matrix"] = outcome(lambda: make_runner(Gossip(weights=wrong)).start(model))
    out["windows_after_refusal"] = len(window._live)

    runner = make_runner(strategy("downpour-ssp", size))
    out["step_before_start"] = outcome(lambda: runner.after_step(model))
    out["finish_before_start"] = outcome(lambda: runner.finish(model))
    runner.start(model)
    out["start_twice"] = outcome(lambda: runner.start(model))
    runner.after_step(model)
    runner.finish(model)
    out["finish_again"] = outcome(lambda: runner.finish(model))
    out["step_after_finish"] = outcome(lambda: runner.after_step(model))
    out["windows_after_finish"] = len(window._live)

    checkpoint = np.linspace(-1.0, 1.0, target(0).size)
    for name in ("downpour", "easgd-ssp", "gossip"):
        model = VectorModel(target(0), target(rank), comm)
        runner = make_runner(strategy(name, size))
        runner.restore(model, None)  # before start: nothing to do
        runner.start(model)
        # ranks at different steps, as in a real run (not under a bound: a rank ahead would wait
        # for one that stopped short at the barrier below, which is the documented deadlock)
        for _ in range(5 + (2 * rank if getattr(runner, "max_staleness", None) is None else 0)):
            model.train_step(0.1)
            runner.after_step(model)
        comm.Barrier()
        model.set_flat(checkpoint)
        runner.restore(model, None)
        runner.finish(model)
        out[f"restarted_{name}"] = float(np.max(np.abs(model.get_flat() - checkpoint)))
    emit(out)
