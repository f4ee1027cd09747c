"""ParameterWindow, InboxWindow and ClockWindow in one process (a world of one, COMM_SELF):
argument checks, the lifecycle, and the arithmetic of push/pull."""

import gc

import numpy as np
import pytest

from hvdagents.errors import ClosedError, UsageError
from hvdagents.strategies.windows import RETIRED, ClockWindow, InboxWindow, ParameterWindow
from hvdagents.strategies.windows import _base as window

MPI = pytest.importorskip("mpi4py.MPI")
SELF = MPI.COMM_SELF


@pytest.fixture
def store():
    with ParameterWindow(5, np.float64, comm=SELF) as w:
        yield w


@pytest.mark.parametrize("n", [0, -3])
def test_window_size_must_be_positive(n):
    with pytest.raises(ValueError, match=rf"ParameterWindow n must be >= 1; got {n}"):
        ParameterWindow(n, comm=SELF)


@pytest.mark.parametrize("n", [2.0, "5", True])
def test_window_size_must_be_an_int(n):
    with pytest.raises(TypeError, match="ParameterWindow n must be an int"):
        ParameterWindow(n, comm=SELF)


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "complex128", "no such type", None])
def test_window_dtype_must_be_float32_or_float64(dtype):
    with pytest.raises(ValueError, match="ParameterWindow dtype must be float32 or float64; got"):
        ParameterWindow(4, dtype, comm=SELF)
    with pytest.raises(ValueError, match="InboxWindow dtype must be float32 or float64"):
        InboxWindow(4, dtype, comm=SELF)


def test_comm_must_be_an_intracommunicator():
    with pytest.raises(TypeError, match="comm must be an mpi4py intracommunicator"):
        ParameterWindow(4, comm="world")


def test_refused_arguments_leave_no_window_behind():
    live = len(window._live)
    with pytest.raises(ValueError):
        ParameterWindow(0, comm=SELF)
    assert len(window._live) == live


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_starts_at_zero_then_init_push_pull(dtype):
    with ParameterWindow(7, dtype, comm=SELF) as w:
        assert (w.size, w.dtype, w.shard_bounds(0)) == (7, np.dtype(dtype), (0, 7))
        assert np.array_equal(w.pull(), np.zeros(7, dtype))
        w.init(np.arange(7, dtype=dtype))
        w.push(np.full(7, 0.5, dtype))
        w.push(np.full(7, 0.25, dtype))
        out = np.empty(7, dtype)
        assert w.pull(out) is out
        assert np.array_equal(out, np.arange(7, dtype=dtype) + dtype(0.75))


@pytest.mark.parametrize("bad, received", [
    (np.zeros(4), r"shape \(4,\) of float64"),
    (np.zeros(5, np.float32), r"shape \(5,\) of float32"),
    (np.zeros((5, 1)), r"shape \(5, 1\) of float64"),
    ([0.0] * 5, "got list"),
])
def test_push_and_init_check_their_argument(store, bad, received):
    expected = "must be a 1-D array of 5 float64" if isinstance(bad, np.ndarray) else "must be a NumPy array"
    with pytest.raises(ValueError, match=f"push delta {expected}.*{received}"):
        store.push(bad)
    with pytest.raises(ValueError, match=f"init values {expected}.*{received}"):
        store.init(bad)
    assert np.array_equal(store.pull(), np.zeros(5))  # nothing was written


def test_pull_checks_out(store):
    with pytest.raises(ValueError, match=r"pull out must be a 1-D array of 5 float64; got shape \(6,\)"):
        store.pull(np.empty(6))
    with pytest.raises(ValueError, match="writable contiguous"):
        store.pull(np.empty(10)[::2])


def test_push_accepts_a_strided_view(store):
    store.push(np.arange(10.0)[::2])
    assert np.array_equal(store.pull(), np.arange(0.0, 10.0, 2.0))


def test_shard_bounds_checks_the_rank(store):
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\); got 1"):
        store.shard_bounds(1)


def test_close_is_idempotent_and_later_operations_raise():
    w = ParameterWindow(3, comm=SELF)
    live = len(window._live)
    w.close()
    w.close()
    assert w.closed and len(window._live) == live - 1
    for op in (lambda: w.push(np.zeros(3, np.float32)), w.pull, lambda: w.init(None)):
        with pytest.raises(ClosedError, match="^ParameterWindow is closed$"):
            op()


def test_context_manager_closes():
    with ParameterWindow(3, comm=SELF) as w, InboxWindow(3, comm=SELF) as p, ClockWindow(comm=SELF) as c:
        assert not (w.closed or p.closed or c.closed)
    assert w.closed and p.closed and c.closed
    with pytest.raises(ClosedError, match="^InboxWindow is closed$"):
        p.read(0)
    with pytest.raises(ClosedError, match="^ClockWindow is closed$"):
        c.tick()


def test_a_dropped_window_warns_and_stays_registered_for_exit():
    w = ParameterWindow(3, comm=SELF)
    key = w._handle.key
    with pytest.warns(ResourceWarning, match="garbage-collected without close"):
        del w
        gc.collect()
    assert key in window._live  # freed by the exit hook, collectively, not by the collector


def test_clock_ticks_retires_and_waits_alone():
    with ClockWindow(comm=SELF) as c:
        assert [c.tick() for _ in range(3)] == [1, 2, 3]
        assert c.clocks().tolist() == [3] and c.clock == 3
        c.wait_until_within(0, timeout=1.0)  # alone: never ahead of the slowest
        with pytest.raises(ValueError, match="staleness must be >= 0; got -1"):
            c.wait_until_within(-1)
        with pytest.raises(TypeError, match="staleness must be an int"):
            c.wait_until_within(1.5)
        c.retire()
        c.retire()
        assert c.retired and c.clocks().tolist() == [RETIRED]
        with pytest.raises(UsageError, match="tick.. was called after retire"):
            c.tick()


def test_public_name():
    import hvdagents as hva

    assert hva.ParameterWindow is ParameterWindow


def test_windows_mode_is_read_from_the_environment_and_checked():
    from hvdagents.strategies.windows.relay import window_mode

    assert window_mode({}) == "auto"
    assert window_mode({"HVDAGENTS_WINDOWS": " Relay "}) == "relay"
    assert window_mode({"HVDAGENTS_WINDOWS": ""}) == "auto"
    with pytest.raises(ValueError, match="HVDAGENTS_WINDOWS must be one of auto, mpi, relay; got 'rdma'"):
        window_mode({"HVDAGENTS_WINDOWS": "rdma"})
