"""Asynchronous strategies across the hosts, one after another in one job (a fresh agent each):
``examples/async_digits.py --framework torch --strategy NAME`` with the examples' defaults, called
in turn. Rank 0 prints one RESULT per strategy: the consensus model's test accuracy after
``close()`` and the steps each rank made (both what the example prints).

    async_across_hosts.py EPOCHS STRATEGY[,STRATEGY...]
"""

import contextlib
import io
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import torch_digits  # noqa: E402
from _report import emit  # noqa: E402

import hvdagents as hva  # noqa: E402

#: AsyncDiLoCo with SGD + momentum inside (see test_async_diloco_mpi.py).
EXTRA = {"asyncdiloco": ["--outer-lr", "0.3"]}

epochs, names = sys.argv[1], sys.argv[2].split(",")
for name in names:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # async_digits.py's defaults: easgd unless named
        accuracy = torch_digits.main(["--strategy", name, "--epochs", epochs, *EXTRA.get(name, [])],
                                     default_strategy="easgd")
    sys.stdout.write(printed.getvalue())
    sys.stdout.flush()
    if hva.init().is_root:
        (steps,) = re.findall(r"steps per rank: \[([0-9, ]+)\]", printed.getvalue())
        (shown,) = re.findall(r"final test accuracy: ([0-9.]+)", printed.getvalue())
        emit({"check": name, "accuracy": accuracy, "shown": float(shown), "steps": [int(s) for s in steps.split(",")]})
