"""The parameter store across hosts: exact, or refused on every rank. RESULT per rank.

``store``: 2500 pushes of 1000 ones from every rank, then 3 pushes of 10^6 ones; the pulls
must hold exactly the totals. If the MPI cannot do it, every rank must get
``OneSidedUnavailableError`` before any push (reported, not raised).
``agent``: a TorchAgent with Downpour, errors not caught: where refused, the job must end
with the error; where not, every rank reports that its agent started.
"""

import socket
import sys

import numpy as np
import torch
from _report import emit

import hvdagents as hva
from hvdagents.strategies.windows import ParameterWindow

ctx = hva.init()
if sys.argv[1] == "agent":
    model = torch.nn.Linear(4, 1)
    with hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=hva.Downpour()):
        emit({"rank": ctx.rank, "agent": "started"})
    sys.exit(0)

out = {"rank": ctx.rank, "host": socket.gethostname(), "refused": False}
try:
    with ParameterWindow(1000, np.float64) as small, ParameterWindow(10**6, np.float32) as large:
        for _ in range(2500):
            small.push(np.ones(1000))
        for _ in range(3):
            large.push(np.ones(10**6, np.float32))
        ctx.comm.Barrier()
        out["small"] = sorted(set(small.pull().tolist()))
        out["large"] = sorted(set(large.pull().tolist()))
        out["through_relay"] = large._layout.relay is not None
        ctx.comm.Barrier()
except hva.OneSidedUnavailableError as err:
    out.update(refused=True, message=str(err))
emit(out)
