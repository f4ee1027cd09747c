"""HVDAGENTS_WINDOWS set per rank before a communicator's first window: ``differ`` (rank 1
says relay, the others auto) or ``bad`` (every rank says an unknown mode). Each case runs on a
fresh duplicate of the world (the mode is read once per communicator); every rank reports the
error it got, and the variable is restored afterwards."""

import os

import numpy as np
from _report import emit

from hvdagents.strategies.windows import ParameterWindow


def run(ctx, case):
    """Every rank emits its RESULT line (case ``modes:CASE``)."""
    saved = os.environ.get("HVDAGENTS_WINDOWS")
    if case == "differ":
        os.environ["HVDAGENTS_WINDOWS"] = "relay" if ctx.rank == 1 else "auto"
    else:
        os.environ["HVDAGENTS_WINDOWS"] = "fastest"
    comm = ctx.comm.Dup()
    try:
        ParameterWindow(10, np.float64, comm=comm).close()
        error = None
    except ValueError as err:
        error = str(err)
    finally:
        comm.Free()
        if saved is None:
            os.environ.pop("HVDAGENTS_WINDOWS")
        else:
            os.environ["HVDAGENTS_WINDOWS"] = saved
    emit({"case": f"modes:{case}", "rank": ctx.rank, "error": error})
