"""Under a 'horovodrun --gloo' launch (no MPI world) every asynchronous strategy, and a
window on the default communicator, refuse to start with a LauncherError naming the fix."""

import numpy as np
from _report import emit
from weak_model import VectorModel, strategy, target

import hvdagents as hva
from hvdagents.errors import LauncherError
from hvdagents.strategies.registry import make_runner
from hvdagents.strategies.windows import ParameterWindow

ctx = hva.init()
out = {"mpi_world": ctx.mpi_world, "size": ctx.size}
for name in ("downpour", "easgd", "gossip"):
    try:
        make_runner(strategy(name, ctx.size)).start(VectorModel(target(0), target(0), ctx.comm))
        out[name] = "started"
    except LauncherError as exc:
        out[name] = str(exc)
try:
    ParameterWindow(4, np.float64)
    out["window"] = "created"
except LauncherError as exc:
    out["window"] = str(exc)
emit(out)
