"""Every multi-rank check of the asynchronous runner in one job, case by case.

``contract`` runs tests/scripts/weak_contract.py for every strategy; ``lifecycle`` runs
weak_lifecycle.py (runner misuse, restore without a snapshot); ``straggler`` runs weak_straggler.py (4 ranks).
Each case prints RESULT lines with its ``case`` name. Args: STEPS PART...
"""

import sys

import weak_contract
import weak_lifecycle
import weak_straggler

import hvdagents as hva

STRATEGIES = ["downpour", "downpour-ssp", "easgd", "gossip", "gossip-ring"]

steps, parts = int(sys.argv[1]), sys.argv[2:]
ctx = hva.init()
for part in parts:
    if part == "contract":
        for name in STRATEGIES:
            weak_contract.run(ctx, name, steps)
    elif part == "lifecycle":
        weak_lifecycle.run(ctx)
    elif part == "straggler":
        weak_straggler.run(ctx)
    else:
        raise SystemExit(f"unknown part {part!r}")
