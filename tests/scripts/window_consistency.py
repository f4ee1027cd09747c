"""No torn reads: pulls taken while others push see only whole values.

Rank r pushes ``(P+1)**r * ones`` P times, pulling after each push.
Every element of a valid pull is an integer whose base-(P+1) digits are the number of pushes
of each rank that element has seen: each digit in [0, P], this rank's digit exactly the
number of pushes it has completed (read-your-writes), and no digit ever going back between
two pulls by one rank. A torn element (bytes of two different sums) or a lost or duplicated
push breaks the digit check.
"""

import numpy as np
from _report import emit

from hvdagents.strategies.windows import ParameterWindow


def run(ctx, n, pushes):
    """Every rank emits its RESULT line (case ``consistency``)."""
    comm, rank, size = ctx.comm, ctx.rank, ctx.size
    base = pushes + 1
    assert base ** size < 2 ** 53, "digits must stay exact in float64"

    def digits(values):
        """Base-(P+1) digits of integer-valued float64 elements, one row per rank; None if not whole."""
        if not np.array_equal(values, np.floor(values)) or values.min() < 0 or values.max() >= base ** size:
            return None
        rest = values.astype(np.int64)
        out = np.empty((size, values.size), np.int64)
        for r in range(size):
            rest, out[r] = np.divmod(rest, base)
        return out

    bad_pull = own_wrong = went_back = 0
    store = ParameterWindow(n, np.float64)
    mine = np.full(n, float(base ** rank))
    previous = np.zeros((size, n), np.int64)
    comm.Barrier()
    for done in range(1, pushes + 1):
        store.push(mine)
        d = digits(store.pull())
        if d is None:
            bad_pull += 1
            continue
        own_wrong += int(np.any(d[rank] != done))
        went_back += int(np.any(d < previous))
        previous = d
    comm.Barrier()
    final = digits(store.pull())
    final_exact = final is not None and bool(np.all(final == pushes))
    store.close()
    emit({"case": "consistency", "rank": rank, "bad_pull": bad_pull, "own_wrong": own_wrong,
          "went_back": went_back, "final_exact": final_exact})
