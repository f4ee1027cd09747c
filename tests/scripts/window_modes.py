"""HVDAGENTS_WINDOWS set per rank before the first window: ``differ`` (rank 1 says relay, the
others auto) or ``bad`` (every rank says an unknown mode). Every rank reports the error it got."""

import os
import sys

import numpy as np
from _report import emit

import hvdagents as hva
from hvdagents.strategies.windows import ParameterWindow

ctx = hva.init()
if sys.argv[1] == "differ":
    os.environ["HVDAGENTS_WINDOWS"] = "relay" if ctx.rank == 1 else "auto"
else:
    os.environ["HVDAGENTS_WINDOWS"] = "fastest"
try:
    ParameterWindow(10, np.float64).close()
    emit({"rank": ctx.rank, "error": None})
except ValueError as err:
    emit({"rank": ctx.rank, "error": str(err)})
