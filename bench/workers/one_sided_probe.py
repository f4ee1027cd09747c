"""The windows' one-sided probe between the ranks of this job (what every agent runs before
its first window): rank 0 prints the verdict."""

from __future__ import annotations

import hvdagents as hva
from bench.workers._util import emit
from hvdagents.strategies.windows.transport import probe

ctx = hva.init()
verdict = probe(ctx.comm)
if ctx.is_root:
    emit({"ok": verdict.ok, "nodes": verdict.nodes, "detail": verdict.detail})
