"""MetricsLog: rank-0-only CSV rows, fixed header, append on resume. One process, no MPI."""

import csv

import pytest

from hvdagents.errors import ClosedError
from hvdagents.metrics import MetricsLog


def read(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_header_from_first_row_and_rows_visible_before_close(tmp_path):
    path = tmp_path / "runs" / "m.csv"
    log = MetricsLog(path, is_root=True)
    log.log(epoch=1, loss=0.5, accuracy=None)
    log.log(epoch=2, loss=0.25)  # missing key: empty cell
    assert read(path) == [["epoch", "loss", "accuracy"], ["1", "0.5", ""], ["2", "0.25", ""]]
    log.close()


def test_new_column_after_the_first_row_is_refused(tmp_path):
    with MetricsLog(tmp_path / "m.csv", is_root=True) as log:
        log.log(step=1, loss=1.0)
        with pytest.raises(ValueError, match=r"new column\(s\) \['accuracy'\]"):
            log.log(step=2, loss=0.5, accuracy=0.9)
    assert read(tmp_path / "m.csv") == [["step", "loss"], ["1", "1.0"]]


def test_other_ranks_write_nothing(tmp_path):
    path = tmp_path / "sub" / "m.csv"
    with MetricsLog(path, is_root=False) as log:
        log.log(step=1, loss=1.0)
    assert not path.exists() and not path.parent.exists()


def test_append_keeps_the_header_and_earlier_rows(tmp_path):
    path = tmp_path / "m.csv"
    with MetricsLog(path, is_root=True) as log:
        log.log(epoch=1, loss=1.0)
    with MetricsLog(path, is_root=True, append=True) as log:
        log.log(epoch=2, loss=0.5)
        with pytest.raises(ValueError):
            log.log(epoch=3, acc=0.1)
    assert read(path) == [["epoch", "loss"], ["1", "1.0"], ["2", "0.5"]]
    with MetricsLog(path, is_root=True) as log:  # without append: a fresh file
        log.log(epoch=1, loss=2.0)
    assert read(path) == [["epoch", "loss"], ["1", "2.0"]]


def test_log_after_close_raises_on_every_rank(tmp_path):
    for is_root in (True, False):
        log = MetricsLog(tmp_path / f"{is_root}.csv", is_root=is_root)
        log.close()
        log.close()
        with pytest.raises(ClosedError):
            log.log(step=1)
