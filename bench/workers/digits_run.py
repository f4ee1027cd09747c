"""One run of ``examples/async_digits.py`` (any framework and strategy): rank 0 reports its
own model's test accuracy per epoch and the consensus model's after ``close()``:
``digits_run.py CSV_PATH EXAMPLE_ARGS...``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from _util import emit  # noqa: E402


def main() -> None:
    path, rest = sys.argv[1], sys.argv[2:]
    framework = rest[rest.index("--framework") + 1]
    rest = [a for i, a in enumerate(rest) if a != "--framework" and (i == 0 or rest[i - 1] != "--framework")]
    if framework == "torch":
        import torch_digits as example
    else:
        import keras_digits as example
    consensus = example.main([*rest, "--csv", path], default_strategy="easgd")
    import hvdagents as hva

    if hva.init().is_root:
        with open(path) as handle:
            accuracy = [float(row["accuracy"]) for row in csv.DictReader(handle)]
        emit({"framework": framework, "args": rest, "accuracy": accuracy, "consensus": consensus})


if __name__ == "__main__":
    main()
