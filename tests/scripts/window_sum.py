"""No update lost: every rank pushes many integer-valued vectors at once; the final pull
must equal the exact sum (plus rank 0's initial values) on every rank.

Integer values keep every partial sum exact in float32 and float64, so "equal" means
bit-equal.
"""

import numpy as np
from _report import emit

from hvdagents.strategies.windows import ParameterWindow


def run(ctx, n, dtype, pushes):
    """Every rank emits its RESULT line (case ``sum:N:DTYPE``)."""
    comm, dtype = ctx.comm, np.dtype(dtype)

    def pushes_of(rank):
        return np.random.default_rng(1000 + rank).integers(0, 4, size=(pushes, n)).astype(dtype)

    initial = (np.arange(n) % 7).astype(dtype)
    store = ParameterWindow(n, dtype)
    store.init(initial if ctx.rank == 0 else None)
    after_init = store.pull()
    mine = pushes_of(ctx.rank)
    comm.Barrier()  # everyone pushes at the same time
    for delta in mine:
        store.push(delta)
    comm.Barrier()  # every push complete
    final = store.pull()
    expected = initial + sum(pushes_of(r).sum(axis=0, dtype=np.float64) for r in range(ctx.size)).astype(dtype)
    emit({
        "case": f"sum:{n}:{dtype}",
        "rank": ctx.rank,
        "init_equal": bool(np.array_equal(after_init, initial)),
        "equal": bool(np.array_equal(final, expected)),
        "max_error": float(np.max(np.abs(final.astype(np.float64) - expected))),
        "shard": list(store.shard_bounds(ctx.rank)),
        "dtype": str(final.dtype),
        "groups": store._layout.groups,  # ranks sharing MPI windows: 1 group on one host, np with the relay
    })
    store.close()
