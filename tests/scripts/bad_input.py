"""Bad input that differs between ranks: every case must raise the same error on every rank
(type and message naming the field), and the job must go on to the next case.

``python bad_input.py torch|keras``. One RESULT line per case per rank: ``{"case", "rank",
"error": exception type or null, "message"}``; a case that left one rank waiting in a
collective shows as a job that never ends (the test's timeout) and missing RESULT lines. After
the cases an agent is made with good arguments, steps and closes (``healthy``): a refusal left
nothing behind that breaks the next agent.
"""

import os
import sys

import numpy as np
from _report import emit

import hvdagents as hva
from hvdagents.strategies.windows import ParameterWindow

ctx = hva.init()
comm = ctx.comm
framework = sys.argv[1]
other = ctx.rank == 1  # the rank whose input differs


def case(name, make):
    """Run ``make()`` on every rank; report what it raised (nothing: error null)."""
    try:
        made = make()
    except Exception as err:  # noqa: BLE001 - reported, the test judges it
        emit({"case": name, "rank": ctx.rank, "error": type(err).__name__, "message": str(err)})
    else:
        emit({"case": name, "rank": ctx.rank, "error": None, "message": ""})
        if hasattr(made, "close"):
            made.close()
    comm.Barrier()  # the next case starts together (a rank left behind would hang the job here)


def with_env(value_here, value_on_other, make):
    """``make()`` with HVDAGENTS_WINDOWS set per rank (``None``: unset), restored after."""
    def run():
        value = value_on_other if other else value_here
        old = os.environ.pop("HVDAGENTS_WINDOWS", None)
        if value is not None:
            os.environ["HVDAGENTS_WINDOWS"] = value
        try:
            return make()
        finally:
            os.environ.pop("HVDAGENTS_WINDOWS", None)
            if old is not None:
                os.environ["HVDAGENTS_WINDOWS"] = old
    return run


def window(n=4, dtype=np.float64):
    return lambda: ParameterWindow(n, dtype, comm=comm.Dup())  # a new communicator: no cached layout


if framework == "torch":
    import torch

    def model(width=8):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def agent(strategy_here, strategy_on_other=None, *, model_on_other=None):
        def make():
            m = model_on_other() if other and model_on_other is not None else model()
            strategy = strategy_on_other if other and strategy_on_other is not None else strategy_here
            opt = torch.optim.SGD(m.parameters(), lr=0.1) if isinstance(m, torch.nn.Module) else None
            return hva.TorchAgent(m, opt, strategy=strategy)
        return make

    case("strategy_kind", agent(hva.Sync(), hva.Downpour()))
    case("localsgd_period", agent(hva.LocalSGD(period=2), hva.LocalSGD(period=3)))
    case("sync_compression", agent(hva.Sync(), hva.Sync(compression="fp16")))
    case("easgd_alpha", agent(hva.EASGD(alpha=0.1), hva.EASGD(alpha=0.2)))
    case("downpour_max_staleness", agent(hva.Downpour(), hva.Downpour(max_staleness=2)))
    case("gossip_seed", agent(hva.Gossip(seed=0), hva.Gossip(seed=1)))
    case("strategy_wrong_type", agent(hva.Sync(), "sync"))
    case("model_wrong_type", agent(hva.Sync(), model_on_other=lambda: None))
    case("model_differs", agent(hva.Downpour(), model_on_other=lambda: model(width=9)))
    case("gossip_weights_for_other_size", agent(hva.Gossip(weights=[[1.0]])))
    case("windows_env_differs", with_env("auto", "relay", window()))
    case("windows_env_bad", with_env(None, "rdma", window()))
    case("agent_windows_env_differs", with_env("auto", "relay", agent(hva.EASGD())))
    case("window_n_differs", lambda: window(n=5 if other else 4)())
    case("window_n_wrong_type", lambda: window(n=4.0 if other else 4)())
    case("window_dtype_bad", lambda: window(dtype=np.int8 if other else np.float64)())

    # An optimizer that belongs to an open agent, passed again on rank 1 only; then the open
    # agent trains and closes: the refusals left nothing behind.
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with hva.TorchAgent(m, opt, strategy=hva.Sync()) as open_agent:
        def reuse():
            m2 = model()
            return hva.TorchAgent(m2, opt if other else torch.optim.SGD(m2.parameters(), lr=0.1))
        case("optimizer_reused", reuse)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(ctx.rank))
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    flat = open_agent.flat_parameters()
    same = comm.allgather(flat.tobytes())
    emit({"case": "healthy", "rank": ctx.rank, "error": None, "message": "",
          "identical": len(set(same)) == 1, "finite": bool(np.isfinite(flat).all())})
else:
    import keras

    def compiled(compile_it=True):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        if compile_it:
            m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return m

    case("keras_model_not_compiled", lambda: hva.KerasAgent(compiled(not other), strategy=hva.Sync()))
    case("keras_strategy_kind", lambda: hva.KerasAgent(compiled(), strategy=hva.EASGD() if other else hva.Sync()))
    case("keras_localsgd_period",
         lambda: hva.KerasAgent(compiled(), strategy=hva.LocalSGD(period=3 if other else 2)))
    m = compiled()
    with hva.KerasAgent(m, strategy=hva.Sync()) as open_agent:
        x = np.random.default_rng(ctx.rank).normal(size=(16, 4)).astype(np.float32)
        open_agent.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0)
    flat = open_agent.flat_parameters()
    same = comm.allgather(flat.tobytes())
    emit({"case": "healthy", "rank": ctx.rank, "error": None, "message": "",
          "identical": len(set(same)) == 1, "finite": bool(np.isfinite(flat).all())})
