"""``python -m hvdagents plot``: a CSV written by MetricsLog becomes a real PNG."""

import math
import struct
import sys

import matplotlib
import matplotlib.image as plt_image
import numpy as np
import pytest

from hvdagents.metrics import MetricsLog
from hvdagents.plot import plot_runs, read_csv
from mpirun import run_command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_run(path, epochs=5, *, val=True):
    with MetricsLog(path, is_root=True) as log:
        for epoch in range(1, epochs + 1):
            row = {"epoch": epoch, "step": 10 * epoch, "loss": 2.0 / epoch, "accuracy": 1 - 0.5 / epoch}
            if val:
                row["val_accuracy"] = None if epoch == 2 else 1 - 0.6 / epoch
            log.log(**row)


def test_cli_writes_a_png_from_a_metrics_log(tmp_path):
    csv_path, png = tmp_path / "run.csv", tmp_path / "out" / "run.png"
    write_run(csv_path)
    command = [sys.executable, "-m", "hvdagents", "plot", str(csv_path), "-o", str(png)]
    run_command(command, timeout=120).check()
    width, height = png_size(png)
    assert (width, height) == (1200, 400)  # two panels (loss, accuracy) at 6x4 inches, 100 dpi
    assert png.stat().st_size > 10_000
    # The curves are really drawn: matplotlib's first two line colours, in the right panels.
    pixels = plt_image.imread(png)[..., :3]
    left, right = pixels[:, :600], pixels[:, 600:]
    assert colour_pixels(left, "C0") > 500, "no loss curve in the left panel"
    assert colour_pixels(right, "C0") > 500 and colour_pixels(right, "C1") > 500, "accuracy curves missing"
    assert colour_pixels(left, "C1") == 0, "val_accuracy drawn in the loss panel"


def colour_pixels(pixels, colour):
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(pixels - rgb).max(axis=-1) < 0.02).sum())


def test_one_panel_when_there_is_only_a_loss_and_overlay_of_runs(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    with MetricsLog(a, is_root=True) as log:
        for step in range(1, 50):
            log.log(step=step, loss=1 / step)
    write_run(b, val=False)
    one = plot_runs([a], tmp_path / "one.png")
    assert png_size(one) == (600, 400)
    both = plot_runs([a, b], tmp_path / "both.png", title="a vs b")
    assert png_size(both) == (1200, 400)


def test_read_csv_skips_empty_cells_and_text_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("epoch,strategy,loss,val_accuracy\n1,easgd,0.5,\n2,easgd,0.25,0.9\n")
    cols = read_csv(path)
    assert set(cols) == {"epoch", "loss", "val_accuracy"}
    assert math.isnan(cols["val_accuracy"][0]) and cols["val_accuracy"][1] == 0.9


def test_nothing_to_plot_is_an_error_not_an_empty_png(tmp_path, capsys):
    from hvdagents import plot

    path = tmp_path / "r.csv"
    path.write_text("epoch,lr\n1,0.1\n")
    assert plot.main([str(path), "-o", str(tmp_path / "x.png")]) == 1
    assert "no loss or accuracy columns" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="no such numeric column"):
        write_run(tmp_path / "ok.csv")
        plot_runs([tmp_path / "ok.csv"], tmp_path / "y.png", x="time")
