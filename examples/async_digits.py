"""Asynchronous training on scikit-learn's digits: pick the framework and the strategy.

    mpirun -np 4 --oversubscribe python examples/async_digits.py --framework torch --strategy easgd
    mpirun -np 4 --oversubscribe python examples/async_digits.py --framework keras --strategy downpour

Every rank trains at its own pace and shares parameters one-sidedly through MPI windows
(no rank waits for another, unless --max-staleness bounds the drift). Rank 0 prints the
final test accuracy of the consensus model and how many steps each rank made. All flags of
torch_digits.py / keras_digits.py apply (--period, --alpha, --epochs, --csv, ...).
"""

from __future__ import annotations

import argparse
import sys

def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--framework", choices=["torch", "keras"], default="torch")
    known, rest = pick.parse_known_args()
    if known.framework == "torch":
        import torch_digits as example
    else:
        import keras_digits as example
    example.main(rest, default_strategy="easgd")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
    main()
