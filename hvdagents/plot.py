"""``python -m hvdagents plot run.csv [more.csv ...] -o run.png``: training curves to a PNG.

Reads CSV files as written by :class:`hvdagents.metrics.MetricsLog`. The x axis is the
``step`` column when there is one, else ``epoch``, else the row number (``--x`` chooses).
Columns whose name contains ``loss`` are drawn in one panel, those containing ``acc`` in
another; several files are overlaid, labelled by file name, to compare runs. Empty cells
are skipped. Uses matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["read_csv", "plot_runs", "main"]

#: Panels: (title, substring a column name must contain).
PANELS = (("loss", "loss"), ("accuracy", "acc"))
#: Columns never drawn as curves.
AXIS_COLUMNS = ("step", "epoch", "time", "rank")


def read_csv(path: str | Path) -> dict[str, list[float]]:
    """The numeric columns of a CSV file, as float lists (empty or non-numeric cells: NaN).

    Columns with no numeric cell at all are left out.
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    columns: dict[str, list[float]] = {}
    for name in rows[0]:
        if name is None:
            continue
        values = []
        for row in rows:
            try:
                values.append(float(row.get(name) or "nan"))
            except ValueError:
                values.append(math.nan)
        if any(not math.isnan(v) for v in values):
            columns[name] = values
    return columns


def _x_axis(columns: dict[str, list[float]], choice: str) -> tuple[str, list[float]]:
    n = len(next(iter(columns.values()))) if columns else 0
    if choice == "auto":
        choice = next((name for name in ("step", "epoch") if name in columns), "row")
    if choice == "row":
        return "row", [float(i) for i in range(n)]
    if choice not in columns:
        raise ValueError(f"--x {choice!r}: no such numeric column; have {sorted(columns)}")
    return choice, columns[choice]


def plot_runs(
    paths: Sequence[str | Path], output: str | Path, *, x: str = "auto", title: str | None = None
) -> Path:
    """Draw the loss and accuracy curves of the CSV files in ``paths`` to the PNG ``output``.

    Raises ``ValueError`` when no file has a loss or accuracy column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(p), read_csv(p)) for p in paths]
    panels = [
        (panel, key) for panel, key in PANELS
        if any(key in name.lower() and name not in AXIS_COLUMNS for _, cols in runs for name in cols)
    ]
    if not panels:
        names = sorted({name for _, cols in runs for name in cols})
        files = [str(p) for p in paths]
        raise ValueError(f"no loss or accuracy columns to plot in {files}; columns: {names}")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    xlabel = "row"
    for ax, (panel, key) in zip(axes[0], panels):
        for path, cols in runs:
            if not cols:
                continue
            xlabel, xs = _x_axis(cols, x)
            for name, ys in cols.items():
                if key not in name.lower() or name in AXIS_COLUMNS:
                    continue
                points = [(a, b) for a, b in zip(xs, ys) if not (math.isnan(a) or math.isnan(b))]
                if not points:
                    continue
                label = name if len(runs) == 1 else f"{path.stem}: {name}"
                ax.plot([a for a, _ in points], [b for _, b in points], label=label,
                        marker="o" if len(points) < 30 else None)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hvdagents plot``; returns an exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hvdagents plot",
        description="Draw loss/accuracy curves from metrics CSV files (MetricsLog) to a PNG.",
    )
    parser.add_argument("csv", nargs="+", help="metrics CSV file(s); several are overlaid")
    parser.add_argument("-o", "--output", required=True, help="the PNG file to write")
    parser.add_argument("--x", default="auto",
                        help="x column: auto (step, else epoch), row, or a column name")
    parser.add_argument("--title", default=None, help="figure title")
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = plot_runs(ns.csv, ns.output, x=ns.x, title=ns.title)
    except (OSError, ValueError) as exc:
        print(f"hvdagents plot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
